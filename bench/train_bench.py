"""Training throughput: the job's loop against the seeds' loop and Keras fit.

Every loop trains the same network (simple_cnn) on the same synthetic images,
batch 64, augmentation off, Adam at 1e-3, in this one process, so the only
thing that differs between rows is the loop itself. Usage:

    .venv/bin/python bench/train_bench.py [--quick] [--repeats R] [--steps-per-loop N] [--out FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TensorFlow import

import argparse
import gc
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, too

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from job import config, controller, model, report, sources
from job.parts import build, chunks

BATCH = 64
LR = 1e-3
VALIDATION = 1_000  # the job needs a validation split (its epoch report prints val_loss)


def job_config(train_size: int, *extra: str) -> config.Config:
    # train_size + VALIDATION synthetic examples leave exactly `train_size` to train on.
    return config.load_config(None, [f"data.synthetic.train_size={train_size + VALIDATION}",
                                     f"data.validation_size={VALIDATION}", "data.synthetic.test_size=500",
                                     "data.augment=false", "model.name=simple_cnn", "train.optimizer=adam",
                                     f"train.learning_rate={LR}", f"train.batch_size={BATCH}", *extra])


# Each loop is built once (fresh model and optimizer) and returns a function
# that trains one epoch and says how many images it trained on.

def job_loop(splits: sources.Splits, cfg: config.Config):
    """The job's own parts and steps (job.parts.build, job.parts.chunks), without the controller's bookkeeping."""
    parts = build(cfg, splits)
    spe = parts.stream.steps_per_epoch

    def epoch(e: int) -> int:
        parts.trainer.reset_sums()
        return sum(chunk.steps for chunk in chunks(cfg, parts, e, 0, (e + 1) * spe)) * cfg.train.batch_size

    return epoch


def seeds_loop(splits: sources.Splits):
    """The textbook custom loop the project started from: numpy slices into a @tf.function step."""
    x, y = splits.x_train, splits.y_train  # uint8, as the job feeds them: the model rescales itself
    net = model.build("simple_cnn")
    optimizer = keras.optimizers.Adam(LR)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    mean_loss, accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = net(images, training=True)
            loss = loss_fn(labels, logits)
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        mean_loss.update_state(loss)
        accuracy.update_state(labels, logits)

    def epoch(e: int) -> int:
        mean_loss.reset_state()
        accuracy.reset_state()
        steps = len(x) // BATCH  # the ragged tail dropped, like the job, so both do the same steps
        for i in range(steps):
            step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
        float(mean_loss.result())  # the epoch is over only when its last step has run
        return steps * BATCH

    return epoch


def fit_loop(splits: sources.Splits):
    net = model.build("simple_cnn")
    net.compile(keras.optimizers.Adam(LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])

    def epoch(e: int) -> int:
        net.fit(splits.x_train, splits.y_train, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
        return len(splits.x_train)  # fit also trains the ragged last batch

    return epoch


def cli_run(train_size: int, steps_per_loop: int) -> float:
    """`cifar-job train` in-process for two epochs (the first is its warm-up);
    the second epoch's images/s as its metrics.jsonl records it."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(train_size, "train.epochs=2", f"train.steps_per_loop={steps_per_loop}",
                         f"checkpoint.uri={tmp}/checkpoints", f"export.uri={tmp}/export", "checkpoint.resume=never")
        try:
            controller.run(cfg, report.Console("text", stream=io.StringIO()))
        finally:
            # controller.run turns on op determinism (train.deterministic) for the
            # whole process; turn it off again so that the other loops run as
            # they would on their own. (No public API for this.)
            tf_config.disable_op_determinism()
        lines = Path(cfg.checkpoint.uri, "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["images_per_second"]


def measure(loops: dict, repeats: int, self_timed: dict | None = None) -> tuple[dict, dict]:
    """Each loop's images/s and CPU µs/image over `repeats` timed epochs,
    after one untimed epoch each (the first call traces and compiles).
    `self_timed` rows are functions returning their own images/s."""
    self_timed = self_timed or {}
    for epoch in loops.values():
        epoch(0)
    names = [*loops, *self_timed]
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(1, repeats + 1):
        # Interleaved, so whatever else the machine does lands on every loop
        # alike, and rotated (A B C, B C A, ...) so no loop always follows
        # the same one.
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()  # the previous loop's garbage is not this one's time
            if name in self_timed:
                rates[name].append(self_timed[name]())
                continue
            # CPU time (all threads) too: it hardly moves when other processes
            # compete for the cores, where wall-clock rates can halve.
            wall, busy = time.perf_counter(), time.process_time()
            images = loops[name](r)
            rates[name].append(images / (time.perf_counter() - wall))
            cpu[name].append((time.process_time() - busy) / images * 1e6)
    return rates, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 examples, 1 repeat: a smoke test, not a measurement")
    ap.add_argument("--repeats", type=int, help="timed epochs per loop (default 5, --quick 1)")
    ap.add_argument("--train-size", type=int, help="training examples (default 10,000, --quick 2,000)")
    default_spl = config.Train().steps_per_loop
    ap.add_argument("--steps-per-loop", type=int, default=default_spl,
                    help=f"the job's train.steps_per_loop (default: the job's, {default_spl})")
    ap.add_argument("--out", help="also write the results here as JSON")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    size = args.train_size or (2_000 if args.quick else 10_000)

    keras.utils.set_random_seed(0)
    splits = sources.load(job_config(size))
    spl = args.steps_per_loop
    loops = {f"job (steps_per_loop={spl})": job_loop(splits, job_config(size, f"train.steps_per_loop={spl}"))}
    if spl != 1:
        loops["job (steps_per_loop=1)"] = job_loop(splits, job_config(size, "train.steps_per_loop=1"))
    loops["seeds"] = seeds_loop(splits)
    loops["keras fit"] = fit_loop(splits)

    cli_name = f"job CLI end-to-end (metrics.jsonl, steps_per_loop={spl})"
    # A fresh run per repeat, since one run() cannot be interleaved; it
    # times itself (its compiled calls only).
    rates, cpu = measure(loops, repeats, {cli_name: lambda: cli_run(size, spl)})

    seeds = statistics.median(rates["seeds"])
    rows = [{"loop": name, "images_per_second": statistics.median(v), "runs": [round(x, 1) for x in v],
             "cpu_us_per_image": statistics.median(cpu[name]) if name in cpu else None,
             "vs_seeds": statistics.median(v) / seeds} for name, v in rates.items()]
    print(f"simple_cnn, batch {BATCH}, {size:,} synthetic training images, augmentation off, Adam {LR:g}; "
          f"median of {repeats} timed epoch(s) after one untimed warm-up epoch\n")
    print("| loop | images/s (median) | per repeat | CPU µs/image | vs seeds |")
    print("|---|---:|---|---:|---:|")
    for row in rows:
        runs = ", ".join(f"{x:,.0f}" for x in row["runs"])
        busy = "—" if row["cpu_us_per_image"] is None else f"{row['cpu_us_per_image']:.0f}"
        print(f"| {row['loop']} | {row['images_per_second']:,.0f} | {runs} | {busy} | {row['vs_seeds']:.2f}x |")
    if args.out:
        settings = {"model": "simple_cnn", "batch_size": BATCH, "train_size": size, "repeats": repeats,
                    "augment": False, "optimizer": f"adam {LR:g}", "tensorflow": tf.__version__,
                    "cpus": os.cpu_count(), "gpus": len(tf.config.list_physical_devices("GPU"))}
        Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
