"""Scale-out: `cifar-job train` as one process, as two MultiWorkerMirroredStrategy
workers on 127.0.0.1 (TF_CONFIG), and as MirroredStrategy over two logical CPU
devices, on the same config.

Each row is the real CLI in fresh processes; its rate is the second epoch's
`images_per_second` from the chief's `metrics.jsonl` (the job times only its
compiled training calls), and `wall s` is the whole run, start-up, data,
validation, test and export included. Rows are interleaved and rotated across
repeats so that load from elsewhere lands on all of them alike. Usage:

    .venv/bin/python bench/distribute_bench.py [--quick] [--repeats R] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(row: str, train_size: int, batch: int, root: Path) -> dict:
    sets = {"data.synthetic.train_size": train_size + 1000, "data.validation_size": 1000,
            "data.synthetic.test_size": 1000, "train.batch_size": batch, "train.epochs": 2,
            "checkpoint.uri": root / "ckpt", "export.uri": root / "export"}
    if row == "mirrored, 2 CPU devices":
        sets["distribute.cpu_devices"] = 2
    cmd = [sys.executable, "-m", "job", "train", *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]
    envs = [{}]
    if row == "2 workers (TF_CONFIG)":
        workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
        envs = [{"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
                for i in range(2)]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for env in envs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{row}: exit {p.returncode}\n{err[-3000:]}")
    wall = time.perf_counter() - started
    epochs = [json.loads(line) for line in (root / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    return {"images_per_second": epochs[-1]["images_per_second"], "wall_seconds": wall}


ROWS = ("one process", "2 workers (TF_CONFIG)", "mirrored, 2 CPU devices")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images, 1 repeat: a smoke test")
    ap.add_argument("--repeats", type=int, help="runs per row (default 3, --quick 1)")
    ap.add_argument("--batch-size", type=int, default=128, help="the global batch (default 128)")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    size = 2_000 if args.quick else 10_000
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    for r in range(repeats):
        order = ROWS[r % len(ROWS):] + ROWS[: r % len(ROWS)]
        for row in order:
            with tempfile.TemporaryDirectory() as tmp:
                results[row].append(run(row, size, args.batch_size, Path(tmp)))
    base = statistics.median(x["images_per_second"] for x in results[ROWS[0]])
    print(f"\nsimple_cnn, global batch {args.batch_size}, {size:,} synthetic training images, 2 epochs; "
          f"second epoch's images/s from metrics.jsonl; {os.cpu_count()} CPU cores; {repeats} repeat(s)\n")
    print("| run | images/s (median) | per repeat | wall s (median) | vs one process |")
    print("|---|---:|---|---:|---:|")
    rows = []
    for row, runs in results.items():
        rate = statistics.median(x["images_per_second"] for x in runs)
        wall = statistics.median(x["wall_seconds"] for x in runs)
        each = ", ".join(f"{x['images_per_second']:,.0f}" for x in runs)
        print(f"| {row} | {rate:,.0f} | {each} | {wall:.1f} | {rate / base:.2f}x |")
        rows.append({"run": row, "images_per_second": rate, "wall_seconds": wall, "runs": runs})
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
