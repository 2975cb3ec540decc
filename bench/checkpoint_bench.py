"""Checkpoint cost: the step-time overhead of `checkpoint.every_steps: 100`,
on local disk and on S3, against the same loop with no checkpoints.

The run is the job's own: its parts and checkpoint (job.parts.build), its
compiled calls (job.parts.chunks) and its commits (job.checkpoints.Checkpointer, with
CheckpointStore and the background Uploader), driven as job/controller.py drives
them. S3 is moto's server on 127.0.0.1 (MinIO cannot be installed where this
was written), so the S3 rows measure the protocol and the background commit,
not a real network. Usage:

    .venv/bin/python bench/checkpoint_bench.py [--steps N] [--repeats R] [--out FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job import config, sources
from job.checkpoints import Checkpointer, CheckpointStore, Uploader
from job.parts import Parts, build, chunks

EVERY = 100


def run(cfg: config.Config, parts: Parts, checksum: str, steps: int, uri: str | None) -> dict:
    """Train `steps` steps, committing the job's checkpoints into `uri` as they fall due (None: never)."""
    checkpointer = None
    if uri:
        store = CheckpointStore(uri, cfg.checkpoint.keep, Uploader(cfg.checkpoint.retry_seconds))
        checkpointer = Checkpointer(cfg, store, parts, None, checksum)
    parts.progress.step.assign(0)
    saves = []
    started = time.perf_counter()
    for epoch in range(math.ceil(steps / parts.stream.steps_per_epoch)):
        for chunk in chunks(cfg, parts, epoch, 0, steps):
            parts.progress.step.assign_add(chunk.steps)
            if checkpointer and checkpointer.due(chunk):
                t = time.perf_counter()
                checkpointer.commit()
                saves.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    t = time.perf_counter()
    if checkpointer:
        checkpointer.store.flush()
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

    cfg = config.load_config(None, ["data.synthetic.train_size=6000", "data.validation_size=0",
                                    f"checkpoint.every_steps={EVERY}"])
    splits = sources.load(cfg)
    parts = build(cfg, splits)
    tmp = tempfile.mkdtemp()
    rows = {"none": [], "local": [], "s3": []}
    names = list(rows)
    run(cfg, parts, splits.checksum, 200, None)  # warm-up: tracing, allocator and kernel caches, untimed
    for r in range(args.repeats):
        # Interleaved and rotated, so machine noise and order effects land on every row alike.
        for name in names[r % 3:] + names[:r % 3]:
            uri = {"none": None, "local": f"{tmp}/{r}", "s3": f"s3://{bucket}/{r}"}[name]
            before = _cpu_seconds(server.pid)
            rows[name].append(run(cfg, parts, splits.checksum, args.steps, uri))
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
