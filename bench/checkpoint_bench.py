"""Checkpoint cost: the step-time overhead of `checkpoint.every_steps: 100`,
on local disk and on S3, against the same loop with no checkpoints.

The loop is the job's own (Trainer.train_loop, CheckpointStore, Uploader),
driven as job/train.py drives it. S3 is moto's server on 127.0.0.1 (MinIO
cannot be installed where this was written), so the S3 rows measure the
protocol and the background commit, not a real network. Usage:

    .venv/bin/python bench/checkpoint_bench.py [--steps N] [--repeats R] [--out FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf

from job import config, data, model, optim
from job.checkpoints import CheckpointStore, Uploader
from job.loop import Trainer

EVERY = 100


def build(cfg):
    splits = data.load(cfg)
    stream = data.TrainStream(splits.x_train, splits.y_train, cfg.seed, cfg.train.batch_size, False)
    net = model.build("simple_cnn")
    schedule = optim.Schedule(cfg.train, stream.steps_per_epoch)
    opt = optim.build_optimizer(cfg.train, schedule)
    trainer = Trainer(net, opt, cfg.train.batch_size)
    return stream, trainer, tf.train.Checkpoint(model=net, optimizer=opt, trainer=trainer)


def run(stream, trainer, checkpoint, steps: int, uri: str | None) -> dict:
    """Train `steps` steps, checkpointing every EVERY into `uri` (None: never)."""
    store = CheckpointStore(uri, 3, Uploader(60)) if uri else None
    iterator = iter(stream.epoch(0).repeat())
    trainer.train_loop(iterator, tf.constant(1))  # trace outside the timing
    saves, record = [], None
    started = time.perf_counter()
    for step in range(1, steps + 1):
        float(trainer.train_loop(iterator, tf.constant(1)))
        if store and step % EVERY == 0:
            t = time.perf_counter()
            record = store.save(checkpoint, step, record)
            saves.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    t = time.perf_counter()
    if store:
        store.uploader.flush()
    return {"step_ms": 1000 * elapsed / steps, "save_ms": 1000 * statistics.mean(saves) if saves else 0.0,
            "drain_ms": 1000 * (time.perf_counter() - t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{server._server.server_port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)

    cfg = config.load_config(None, ["data.synthetic.train_size=6000", "data.validation_size=0"])
    stream, trainer, checkpoint = build(cfg)
    tmp = tempfile.mkdtemp()
    rows = {"none": [], "local": [], "s3": []}
    for r in range(args.repeats):
        for name in rows:  # interleaved, so machine noise lands on every row alike
            uri = {"none": None, "local": f"{tmp}/{r}", "s3": f"s3://{bucket}/{r}"}[name]
            rows[name].append(run(stream, trainer, checkpoint, args.steps, uri))
    server.stop()

    base = statistics.median(x["step_ms"] for x in rows["none"])
    results = []
    print(f"simple_cnn, batch 64, {args.steps} steps per run, checkpoint every {EVERY} steps; "
          f"median of {args.repeats} interleaved runs\n")
    print("| storage | step ms (median) | measured overhead | save ms (blocking) | blocking share | final drain ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        step = statistics.median(x["step_ms"] for x in runs)
        save = statistics.median(x["save_ms"] for x in runs)
        drain = statistics.median(x["drain_ms"] for x in runs)
        # What training waits for: the snapshot, once every EVERY steps. The
        # upload runs beside training; its cost shows only in the wall-clock
        # column, which on two busy cores is within a few percent of noise.
        share = save / (EVERY * base)
        results.append({"storage": name, "step_ms": step, "overhead": step / base - 1, "save_ms": save,
                         "blocking_share": share, "drain_ms": drain})
        print(f"| {name} | {step:.2f} | {100 * (step / base - 1):+.1f} % | {save:.1f} | {100 * share:.1f} % "
              f"| {drain:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
