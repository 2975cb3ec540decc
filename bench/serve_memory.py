"""Serving memory: the resident memory of `cifar-serve`'s gunicorn master and
of each worker, for each model and worker count, after every worker has
answered real requests.

    .venv/bin/python bench/serve_memory.py [--models simple_cnn,resnet,airbench:0.5] [--workers 1,2] [--requests 300]
        [--out FILE]

Each model is exported untrained (the weights' values do not change their
size). For each worker count the service starts alone on 127.0.0.1, is asked
/readyz until ready, then gets `--requests` requests, each on a new
connection so that gunicorn's workers share them, from 8 threads: in turn a
sample photo to POST /predict and a TF Serving REST :predict of 32x32x3
pixels. The access log is switched (GUNICORN_CMD_ARGS) to carry the
answering worker's pid, so the count per worker is known, not assumed; a
worker that answered nothing fails the run. Then /proc is read for every
process (MiB): VmRSS (what `ps` and `top` call RSS) once all workers are
ready and again after the requests, and after the requests: RssAnon and
RssFile (RSS in anonymous memory and in mapped files, mostly TensorFlow's
shared libraries), USS (smaps_rollup's Private_Clean + Private_Dirty: what
no other process maps, so what stopping this one frees), Pss (each shared
page divided among the processes mapping it, which includes any other
process on the machine using the same TensorFlow install) and VmHWM (the
peak RSS).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import concurrent.futures
import json
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
SAMPLES = sorted((ROOT / "serve" / "static" / "samples").glob("*.png"))
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict:
    """The process's memory figures, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {f: int(re.search(rf"^{f}:\s+(\d+) kB", status, re.M).group(1)) for f in STATUS_FIELDS}
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    rollup_kb = {f: int(re.search(rf"^{f}:\s+(\d+) kB", rollup, re.M).group(1))
                 for f in ("Pss", "Private_Clean", "Private_Dirty")}
    values["Pss"] = rollup_kb["Pss"]
    values["Uss"] = rollup_kb["Private_Clean"] + rollup_kb["Private_Dirty"]
    return {k: round(v / 1024, 1) for k, v in values.items()}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # not a process, or one that just ended
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


def request(url: str, i: int) -> None:
    if i % 2:
        data, path, kind = SAMPLES[i % len(SAMPLES)].read_bytes(), "/predict", "image/png"
    else:
        pixels = [[[(i + x + y + c) % 256 for c in range(3)] for x in range(32)] for y in range(32)]
        data, path = json.dumps({"instances": [pixels]}).encode(), "/v1/models/cifar10:predict"
        kind = "application/json"
    # urllib closes the connection after each request: every request is a new accept, open to any worker.
    with urllib.request.urlopen(urllib.request.Request(url + path, data, {"Content-Type": kind}), timeout=60) as r:
        assert r.status == 200, r.status
        r.read()


def measure(base: Path, workers: int, requests: int, tmp: Path) -> dict:
    port = free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp / f"serve-{workers}.log"
    env = {**os.environ, "SERVE_WORKERS": str(workers),
           "GUNICORN_CMD_ARGS": "--access-logformat 'pid=%(p)s \"%(r)s\" %(s)s'"}
    proc = subprocess.Popen([str(BIN / "cifar-serve"), "--model-uri", str(base), "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"serve_memory: the service never became ready; its log ends:\n"
                         f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        # /readyz answers once any one worker has loaded the model; "ready" memory is after every worker has.
        pids = children(proc.pid)
        assert len(pids) == workers, f"expected {workers} workers under {proc.pid}, found {pids}"
        while not set(pids) <= {int(p) for p in re.findall(r"\[(\d+)\] \[INFO\] serve: serving ",
                                                            log_path.read_text())}:
            if time.monotonic() > deadline:
                sys.exit(f"serve_memory: not every worker loaded the model; its log ends:\n"
                         f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        ready = {pid: memory(pid) for pid in [proc.pid, *pids]}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: request(url, i), range(requests)))
        time.sleep(1)  # the access log line is written after the response
        answered = Counter(int(p) for p in re.findall(r"^pid=<(\d+)> \"POST ", log_path.read_text(), re.M))
        idle = [pid for pid in pids if not answered[pid]]
        assert not idle, f"workers {idle} answered no request: {dict(answered)}"
        warm = {pid: memory(pid) for pid in [proc.pid, *pids]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"workers": workers, "requests": requests,
            "processes": [{"role": "master" if pid == proc.pid else "worker", "pid": pid,
                           "answered": answered.get(pid, 0), "ready": ready[pid], **warm[pid]}
                          for pid in [proc.pid, *pids]]}


def machine() -> dict:
    import tensorflow as tf

    meminfo = Path("/proc/meminfo").read_text()
    return {"cpus": len(os.sched_getaffinity(0)),
            "mem_gib": round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1),
            "gpus": len(tf.config.list_physical_devices("GPU")), "python": platform.python_version(),
            "tensorflow": tf.__version__, "kernel": platform.release()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="simple_cnn,resnet,airbench:0.5",
                        help="model.name[:model.width], comma-separated (airbench:0.5 is make demo's)")
    parser.add_argument("--workers", default="1,2", help="comma-separated SERVE_WORKERS values")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()

    import numpy as np

    from job import export, model

    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name in args.models.split(","):
            base, _, width = name.partition(":")
            keras_model = model.build(base, width=float(width or 1))
            _, uri = export.export(keras_model, str(tmp / name), "cifar10", {}, np.zeros((4, 32, 32, 3), np.uint8))
            size = sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file())
            for workers in map(int, args.workers.split(",")):
                run = measure(tmp / name / "cifar10", workers, args.requests, tmp)
                results.append({"model": name, "parameters": keras_model.count_params(),
                                "export_mib": size / 2**20, **run})
                print(f"{name}, {workers} worker(s): done", file=sys.stderr, flush=True)

    print("| model | workers | process | requests answered | RSS ready | RSS warm | own (USS) | shared (RSS - USS) "
          "| RssAnon | RssFile | Pss | peak RSS |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for p in r["processes"]:
            print(f"| {r['model']} | {r['workers']} | {p['role']} | {p['answered']} | {p['ready']['VmRSS']:.0f} "
                  f"| {p['VmRSS']:.0f} | {p['Uss']:.0f} | {p['VmRSS'] - p['Uss']:.0f} | {p['RssAnon']:.0f} "
                  f"| {p['RssFile']:.0f} | {p['Pss']:.0f} | {p['VmHWM']:.0f} |")
    print("(MiB; warm: after the requests; peak: VmHWM)")
    record = {"machine": machine(), "results": results}
    print(json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
