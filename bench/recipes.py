"""Every recipe under configs/, trained as a user runs it, on one data set:
test accuracy, wall time, training time and images/s, for the record in
docs/benchmarks.md and the table of recipes in docs/training.md.

Each row is `cifar-job train --config configs/<recipe>.yaml` in a fresh
process with `data.uri` pointed at the data given (real CIFAR-10 recipes
only) and its checkpoints and export in a temporary folder. `wall s` is the
whole command (start-up, data, training, test, export); `train s` is the
run's own `elapsed_seconds` at its last epoch; images/s is the mean of its
epochs' `images_per_second`. A recipe too slow for the machine at hand runs
its first epochs only (`--epochs RECIPE=N`: a `train.max_steps` stop, so the
learning-rate schedule is the full recipe's), and its row says so. Usage:

    .venv/bin/python bench/recipes.py --data-uri PATH [--epochs cifar10-resnet=3] [RECIPE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from job import model, sources
from job.config import load_config

TTA_PASSES = {"none": 1, "flip": 2, "flip_translate": 6}


def forward_mflops(name: str, width: float) -> float:
    """Millions of floating-point operations (a multiply-add is two) of one
    image's forward pass through the convolutions and dense layers, which
    are nearly all of it; a training step costs about three times this."""
    import numpy as np

    net = model.build(name, width=width)  # airbench without a sample: a zero whitening kernel, same shape
    flops = 0
    for layer in net.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        # Every output value takes one multiply-add per kernel weight feeding it.
        per_output = int(np.prod(kernel.shape[:-1]))
        flops += 2 * per_output * int(np.prod(layer.output.shape[1:]))
    return flops / 1e6

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(recipe: str, data_uri: str, epochs: int | None) -> dict:
    config = REPO / "configs" / f"{recipe}.yaml"
    file = yaml.safe_load(config.read_text()) or {}
    real = file.get("data", {}).get("source", "synthetic") != "synthetic"
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"checkpoint.uri": f"{tmp}/ckpt", "export.uri": f"{tmp}/export", "checkpoint.resume": "never"}
        if real:
            sets["data.uri"] = data_uri
        if epochs:
            # A stop, not a shorter recipe: the schedule still runs over train.epochs.
            cfg = load_config(config, [f"{k}={v}" for k, v in sets.items()], platform=False)
            sets["train.max_steps"] = epochs * (len(sources.load(cfg).x_train) // cfg.train.batch_size)
        command = [str(BIN / "cifar-job"), "train", "--config", str(config),
                   *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"{recipe}: exit {done.returncode}\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in Path(f"{tmp}/ckpt/metrics.jsonl").read_text().splitlines()]
        card = json.loads(next(Path(f"{tmp}/export").glob("*/1/assets.extra/model_card.json")).read_text())
    net = card["config"]["model"]
    mflops = forward_mflops(net["name"], net["width"])
    return {
        "recipe": recipe, "data": data_uri if real else "synthetic (built in)",
        "epochs": f"{len(rows)} of {file.get('train', {}).get('epochs', 10)}" if epochs else str(len(rows)),
        "test_accuracy": round(card["test_accuracy"], 4), "wall_s": round(wall, 1),
        "train_s": round(rows[-1]["elapsed_seconds"], 1),
        # Of the exported model: test-time augmentation runs the network that many times.
        "inference_mflops": round(mflops * TTA_PASSES[net.get("tta", "none")], 1),
        "train_mflops_per_image": round(3 * mflops, 1),
        "curve": [(r["elapsed_seconds"], r["val_accuracy"]) for r in rows],
        "images_per_second": round(statistics.mean(r["images_per_second"] for r in rows)),
        "command": "cifar-job train --config configs/{}.yaml{}".format(
            recipe, "".join(f" --set {k}={v}" for k, v in sets.items() if not k.startswith(("checkpoint", "export")))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="names under configs/ (default: all)")
    parser.add_argument("--data-uri", required=True, help="the CIFAR-10 data the real-data recipes read")
    parser.add_argument("--epochs", action="append", default=[], metavar="RECIPE=N",
                        help="run only the first N epochs of RECIPE (labelled so)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    limits = {name: int(n) for name, n in (e.split("=") for e in args.epochs)}
    recipes = args.recipes or sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    results = []
    print("| recipe | data | epochs | test accuracy | wall s | train s | images/s | train MFLOP/image "
          "| inference MFLOP/image |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for recipe in recipes:
        row = run(recipe, args.data_uri, limits.get(recipe))
        results.append(row)
        print(f"| {row['recipe']} | {row['data']} | {row['epochs']} | {row['test_accuracy']:.4f} | {row['wall_s']} "
              f"| {row['train_s']} | {row['images_per_second']:,} | {row['train_mflops_per_image']:,} "
              f"| {row['inference_mflops']:,} |", flush=True)
    for row in results:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
