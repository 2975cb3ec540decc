"""Training throughput of the fast recipe (configs/cifar10-fast.yaml): the
job's loop against a minimal hand-written TensorFlow loop and Keras `fit`,
all three training the same network, at the same precision and batch size,
on the same augmented batches, in this one process. Usage:

    .venv/bin/python bench/fast_bench.py [--quick] [--repeats R] [--steps N] [--set KEY=VALUE ...] [--out FILE]

`--set` changes the recipe for every loop alike (train.mixed_precision=false
to time float32), as `cifar-job train --set` would.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TensorFlow import

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, too
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import tensorflow as tf

from job import config, data, model, optim, parts, sources
from train_bench import job_loop, measure

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cifar10-fast.yaml"


def recipe(train_images: int, changes: list[str]) -> config.Config:
    # Synthetic CIFAR-shaped images: what a step costs does not depend on what the pixels show.
    return config.load_config(RECIPE, ["data.source=synthetic", "data.validation_size=0",
                                       f"data.synthetic.train_size={train_images}", "data.synthetic.test_size=100",
                                       *changes], platform=False)


def _network(splits: sources.Splits, cfg: config.Config):
    net = model.build(cfg.model.name, cfg.train.dtype_policy, cfg.model.width, splits.x_train[:5000], seed=cfg.seed)
    steps = len(splits.x_train) // cfg.train.batch_size
    return net, optim.build_optimizer(cfg.train, optim.Schedule(cfg.train, steps)), steps


def _augmented(splits: sources.Splits, cfg: config.Config, e: int):
    """Epoch e's shuffled, cropped and flipped batches, as the job draws them."""
    n, b, pad = len(splits.x_train), cfg.train.batch_size, cfg.data.translate
    order = data.epoch_order(cfg.seed, e, n)
    offsets, flips = data.augment_params(cfg.seed, e, n, pad, cfg.data.flip)
    for i in range(n // b):
        idx = order[i * b:(i + 1) * b]
        yield data.crop_and_flip(tf.constant(splits.x_train[idx]), offsets[idx], flips[idx], pad), splits.y_train[idx]


def minimal_loop(splits: sources.Splits, cfg: config.Config):
    """Tape, loss, gradients, update: a @tf.function step fed batch by batch
    from Python, with the same optimizer and augmentation and nothing else
    (no metrics, no lookahead, no checkpointable state)."""
    net, optimizer, steps = _network(splits, cfg)
    smoothing = cfg.train.label_smoothing

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(net(images, training=True), tf.float32)
            targets = tf.one_hot(labels, 10) * (1 - smoothing) + smoothing / 10
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
        optimizer.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables)
        return loss

    def epoch(e: int) -> int:
        for images, labels in _augmented(splits, cfg, e):
            loss = step(images, labels)
        float(loss)  # the epoch is over only when its last step has run
        return steps * cfg.train.batch_size

    return epoch


def fit_loop(splits: sources.Splits, cfg: config.Config):
    """model.compile + model.fit over the job's own input pipeline (data.TrainStream)."""
    net, optimizer, steps = _network(splits, cfg)
    net.compile(optimizer, keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                label_smoothing=cfg.train.label_smoothing),
                jit_compile=False)
    stream = data.TrainStream(splits.x_train, splits.y_train, cfg.seed, cfg.train.batch_size, cfg.data.augment,
                              cfg.data.translate, cfg.data.flip)

    def epoch(e: int) -> int:
        net.fit(stream.epoch(e).map(lambda x, y: (x, tf.one_hot(y, 10))), epochs=1, verbose=0)
        return steps * cfg.train.batch_size

    return epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 steps an epoch, 1 repeat: a smoke test")
    ap.add_argument("--repeats", type=int, help="timed epochs per loop (default 3, --quick 1)")
    ap.add_argument("--steps", type=int, help="steps per epoch (default 10, --quick 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the recipe")
    ap.add_argument("--out", help="also write the results here as JSON")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 10)
    cfg = recipe(steps * config.load_config(RECIPE, args.set, platform=False).train.batch_size, args.set)
    splits = sources.load(cfg)
    # Process-wide, so all three loops run under the job's determinism setting.
    parts.configure_determinism(cfg)
    loops = {"job (parts.build + parts.chunks)": job_loop(splits, cfg), "minimal tf.function loop":
             minimal_loop(splits, cfg), "keras fit": fit_loop(splits, cfg)}
    rates, cpu = measure(loops, repeats)
    best = max(statistics.median(v) for v in rates.values())
    rows = [{"loop": name, "images_per_second": statistics.median(v), "runs": [round(x, 1) for x in v],
             "cpu_us_per_image": statistics.median(cpu[name]), "vs_best": statistics.median(v) / best}
            for name, v in rates.items()]
    changed = "".join(f" --set {c}" for c in args.set)
    print(f"configs/cifar10-fast.yaml{changed}: {cfg.model.name} width {cfg.model.width}, "
          f"{cfg.train.dtype_policy}, batch {cfg.train.batch_size}, {steps} steps an epoch; "
          f"median of {repeats} timed epoch(s) after one untimed\n")
    print("| loop | images/s (median) | per repeat | CPU µs/image | vs best |")
    print("|---|---:|---|---:|---:|")
    for row in rows:
        runs = ", ".join(f"{x:,.0f}" for x in row["runs"])
        print(f"| {row['loop']} | {row['images_per_second']:,.0f} | {runs} | {row['cpu_us_per_image']:.0f} "
              f"| {row['vs_best']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"tensorflow": tf.__version__, "cpus": os.cpu_count(), "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
