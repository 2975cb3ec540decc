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

from job import config, data, model, optim, sources
from job.checkpoints import CheckpointStore, Uploader
from job.trainer import Trainer

EVERY = 100


def build(cfg):
    splits = sources.load(cfg)
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
    chunk = config.Train().steps_per_loop  # as the job runs by default
    trainer.train_loop(iterator, tf.constant(chunk))  # trace outside the timing
    saves, record = [], None
    started = time.perf_counter()
    for step in range(chunk, steps + 1, chunk):
        float(trainer.train_loop(iterator, tf.constant(chunk)))
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


def _cpu_seconds(pid: int) -> float:
    """CPU time the S3 endpoint has used: on two cores it competes with training."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    import socket
    import subprocess

    import boto3

    # The endpoint runs in a process of its own, as MinIO would: in this
    # process its request handling would hold the GIL against the training loop.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    for _ in range(100):  # until the server listens
        try:
            boto3.client("s3").create_bucket(Bucket=bucket)
            break
        except Exception:
            time.sleep(0.1)

    cfg = config.load_config(None, ["data.synthetic.train_size=6000", "data.validation_size=0"])
    stream, trainer, checkpoint = build(cfg)
    tmp = tempfile.mkdtemp()
    rows = {"none": [], "local": [], "s3": []}
    names = list(rows)
    run(stream, trainer, checkpoint, 200, None)  # warm-up: allocator and kernel caches, untimed
    for r in range(args.repeats):
        # Interleaved and rotated, so machine noise and order effects land on every row alike.
        for name in names[r % 3:] + names[:r % 3]:
            uri = {"none": None, "local": f"{tmp}/{r}", "s3": f"s3://{bucket}/{r}"}[name]
            before = _cpu_seconds(server.pid)
            rows[name].append(run(stream, trainer, checkpoint, args.steps, uri))
            rows[name][-1]["endpoint_cpu_ms"] = 1000 * (_cpu_seconds(server.pid) - before) / (args.steps / EVERY)
    server.terminate()

    base = statistics.median(x["step_ms"] for x in rows["none"])
    results = []
    print(f"simple_cnn, batch 64, {args.steps} steps per run, checkpoint every {EVERY} steps; "
          f"median of {args.repeats} interleaved runs\n")
    print("| storage | step ms (median) | measured overhead | save ms (blocking) | blocking share | final drain ms "
          "| endpoint CPU ms per checkpoint |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        step = statistics.median(x["step_ms"] for x in runs)
        save = statistics.median(x["save_ms"] for x in runs)
        drain = statistics.median(x["drain_ms"] for x in runs)
        endpoint = statistics.median(x["endpoint_cpu_ms"] for x in runs)
        # What training waits for: the snapshot, once every EVERY steps. The
        # upload runs beside training; its cost shows only in the wall-clock
        # column, which on two busy cores is within a few percent of noise.
        share = save / (EVERY * base)
        results.append({"storage": name, "step_ms": step, "overhead": step / base - 1, "save_ms": save,
                         "blocking_share": share, "drain_ms": drain, "endpoint_cpu_ms": endpoint})
        print(f"| {name} | {step:.2f} | {100 * (step / base - 1):+.1f} % | {save:.1f} | {100 * share:.1f} % "
              f"| {drain:.1f} | {endpoint:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
