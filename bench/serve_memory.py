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

    .venv/bin/python bench/serve_memory.py --variants [SPEC] [--rounds 3] [--duration 15] [--out FILE]

Variants: what lowers a worker's memory, and what it costs in throughput.
Each variant is a set of environment variables for the service (SPEC: `;`
between variants, `,` between NAME=value; without SPEC, VARIANTS below), run
against the service's defaults, interleaved (defaults, each variant, then
again) for `--rounds` rounds, one server at a time, with simple_cnn. Each run
starts the service, sends the same 300 new-connection requests, then drives
it with serve_bench's load (wrk, 32 connections, one single-image TF Serving
REST body): a 3 s warm-up, then `--duration` s measured (req/s, and the
server's CPU ms per request from /proc), then reads /proc again. Medians
over rounds, and each variant's ratio to the defaults in the same run.
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
sys.path.insert(0, str(ROOT / "tests"))  # helpers: how a `cifar-serve`'s workers are found, as the tests find them
BIN = Path(sys.executable).parent
SAMPLES = sorted((ROOT / "serve" / "static" / "samples").glob("*.png"))
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads")

from helpers import gunicorn_workers  # noqa: E402  (needs tests/ on sys.path)
# Candidates for a smaller worker, each against the defaults (2 workers of 16 threads on 2 cores).
VARIANTS = ("SERVE_WORKERS=1,SERVE_THREADS=32",  # one TensorFlow runtime instead of one per core
            "SERVE_TF_THREADS=1",  # TensorFlow's intra-op and inter-op pools, one thread each
            "SERVE_TF_THREADS=2",  # what TensorFlow picks itself on 2 cores: the noise floor
            "MALLOC_ARENA_MAX=2",  # glibc's malloc makes up to 8 arenas per core for many threads
            "TF_ENABLE_ONEDNN_OPTS=0")  # TensorFlow's oneDNN kernels off


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict:
    """The process's memory figures, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {f: int(re.search(rf"^{f}:\s+(\d+)", status, re.M).group(1)) for f in STATUS_FIELDS}
    threads = values.pop("Threads")
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    rollup_kb = {f: int(re.search(rf"^{f}:\s+(\d+) kB", rollup, re.M).group(1))
                 for f in ("Pss", "Private_Clean", "Private_Dirty")}
    values["Pss"] = rollup_kb["Pss"]
    values["Uss"] = rollup_kb["Private_Clean"] + rollup_kb["Private_Dirty"]
    return {**{k: round(v / 1024, 1) for k, v in values.items()}, "Threads": threads}


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


def start(base: Path, workers: int | None, tmp: Path, env: dict | None = None) -> tuple:
    """Start the service alone; return (process, url, worker pids, log path) once every worker holds the model."""
    port = free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp / f"serve-{port}.log"
    env = {**os.environ, **({"SERVE_WORKERS": str(workers)} if workers else {}), **(env or {}),
           # Stopping takes SERVE_DRAIN_SECONDS otherwise; memory and throughput do not depend on it.
           "SERVE_DRAIN_SECONDS": "0",
           "GUNICORN_CMD_ARGS": "--access-logformat 'pid=%(p)s \"%(r)s\" %(s)s'"}
    workers = int(env.get("SERVE_WORKERS") or min(len(os.sched_getaffinity(0)), 4))
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
        pids = gunicorn_workers(proc.pid)
        assert len(pids) == workers, f"expected {workers} workers under {proc.pid}, found {pids}"
        # "Ready" memory is once every worker has loaded the model, as each one logs.
        while not set(pids) <= {int(p) for p in re.findall(r"\[(\d+)\] \[INFO\] serve: .* loaded in this worker",
                                                            log_path.read_text())}:
            if time.monotonic() > deadline:
                sys.exit(f"serve_memory: not every worker loaded the model; its log ends:\n"
                         f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        stop(proc)
        raise
    return proc, url, pids, log_path


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def every_worker_answers(url: str, pids: list[int], requests: int, log_path: Path) -> Counter:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: request(url, i), range(requests)))
    time.sleep(1)  # the access log line is written after the response
    answered = Counter(int(p) for p in re.findall(r"^pid=<(\d+)> \"POST ", log_path.read_text(), re.M))
    idle = [pid for pid in pids if not answered[pid]]
    assert not idle, f"workers {idle} answered no request: {dict(answered)}"
    return answered


def measure(base: Path, workers: int, requests: int, tmp: Path) -> dict:
    proc, url, pids, log_path = start(base, workers, tmp)
    try:
        ready = {pid: memory(pid) for pid in [proc.pid, *pids]}
        answered = every_worker_answers(url, pids, requests, log_path)
        warm = {pid: memory(pid) for pid in [proc.pid, *pids]}
    finally:
        stop(proc)
    return {"workers": workers, "requests": requests,
            "processes": [{"role": "master" if pid == proc.pid else "worker", "pid": pid,
                           "answered": answered.get(pid, 0), "ready": ready[pid], **warm[pid]}
                          for pid in [proc.pid, *pids]]}


def measure_variant(base: Path, env: dict, requests: int, duration: int, tmp: Path) -> dict:
    """One run of one variant: memory once ready, then under serve_bench's load, and throughput."""
    from bench import serve_bench

    proc, url, pids, log_path = start(base, None, tmp, env)
    try:
        ready = {pid: memory(pid) for pid in pids}
        every_worker_answers(url, pids, requests, log_path)
        port = int(url.rsplit(":", 1)[1])
        serve_bench.wrk(port, 3, tmp / "post.lua", 32)  # warm-up: connections, thread pools
        cpu = serve_bench.group_cpu_seconds(proc.pid)
        run = serve_bench.wrk(port, duration, tmp / "post.lua", 32)
        run["cpu_ms_per_request"] = (serve_bench.group_cpu_seconds(proc.pid) - cpu) * 1000 / run["requests"]
        time.sleep(1)
        master, warm = memory(proc.pid), [memory(pid) for pid in pids]
    finally:
        stop(proc)
    # What the service holds: what each process holds alone, plus one copy of
    # what the workers share (TensorFlow's libraries), counted once.
    total = master["Uss"] + sum(w["Uss"] for w in warm) + max(w["VmRSS"] - w["Uss"] for w in warm)
    return {**run, "workers": len(pids), "master": master, "ready": [ready[pid] for pid in pids],
            "warm": warm, "total_mib": round(total, 1),
            "pss_sum_mib": round(master["Pss"] + sum(w["Pss"] for w in warm), 1)}


def compare(spec: str | None, rounds: int, requests: int, duration: int, out: str | None) -> None:
    import statistics

    import numpy as np

    from job import export, model

    variants = {"defaults": {}}
    for variant in (spec.split(";") if spec else VARIANTS):
        variants[variant] = dict(kv.split("=", 1) for kv in variant.split(","))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        export.export(model.build("simple_cnn"), str(tmp / "export"), "cifar10", {}, np.zeros((4, 32, 32, 3), np.uint8))
        from bench import serve_bench

        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).tolist()
        (tmp / "body.json").write_text(json.dumps({"instances": [image]}))
        (tmp / "post.lua").write_text(serve_bench.LUA.format(body=tmp / "body.json"))
        for r in range(rounds):  # interleaved: drift on a shared machine lands on every variant alike
            for name, env in variants.items():
                run = measure_variant(tmp / "export" / "cifar10", env, requests, duration, tmp)
                runs[name].append(run)
                print(f"round {r + 1} {name}: {run['rps']:.0f} req/s, {run['cpu_ms_per_request']:.2f} CPU ms/request, "
                      f"worker RSS {[w['VmRSS'] for w in run['warm']]}, USS {[w['Uss'] for w in run['warm']]}, "
                      f"total {run['total_mib']:.0f} MiB", file=sys.stderr, flush=True)

    def med(values):
        return statistics.median(values)

    summary = {}
    for name, rs in runs.items():
        workers = [w for run in rs for w in run["warm"]]  # every worker of every round
        summary[name] = {"workers": rs[0]["workers"], "threads": med(w["Threads"] for w in workers),
                         "rss_ready": med(w["VmRSS"] for run in rs for w in run["ready"]),
                         **{k: med(w[k] for w in workers) for k in ("VmRSS", "Pss", "Uss", "RssAnon", "VmHWM")},
                         "total_mib": med(run["total_mib"] for run in rs), "rps": med(run["rps"] for run in rs),
                         "cpu_ms_per_request": med(run["cpu_ms_per_request"] for run in rs),
                         "p99_ms": med(run["p99_ms"] for run in rs), "errors": sum(run["errors"] for run in rs),
                         "rps_rounds": [round(run["rps"]) for run in rs],
                         "total_rounds": [round(run["total_mib"]) for run in rs]}
    base = summary["defaults"]
    print("| variant | workers | threads/worker | RSS ready | RSS warm | Pss | USS | RssAnon | service total | "
          "vs defaults (memory) | req/s (median) | per round | vs defaults (req/s) | CPU ms/request "
          "| vs defaults (CPU/request) | p99 ms | errors |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['workers']} | {s['threads']:.0f} | {s['rss_ready']:.0f} | {s['VmRSS']:.0f} "
              f"| {s['Pss']:.0f} | {s['Uss']:.0f} | {s['RssAnon']:.0f} | {s['total_mib']:.0f} "
              f"| {s['total_mib'] / base['total_mib']:.2f}x "
              f"| {s['rps']:,.0f} | {', '.join(f'{v:,}' for v in s['rps_rounds'])} | {s['rps'] / base['rps']:.2f}x "
              f"| {s['cpu_ms_per_request']:.2f} | {base['cpu_ms_per_request'] / s['cpu_ms_per_request']:.2f}x "
              f"| {s['p99_ms']:.0f} | {s['errors']} |")
    print("(MiB, per worker, medians over every worker of every round; service total: master and workers' USS "
          "plus the workers' shared pages once)")
    record = {"machine": machine(), "rounds": rounds, "duration_s": duration, "summary": summary, "runs": runs}
    print(json.dumps({"machine": record["machine"], "summary": summary}))
    if out:
        Path(out).write_text(json.dumps(record, indent=2))


def machine() -> dict:
    from common.tfquiet import import_tensorflow_quietly

    import_tensorflow_quietly()
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
    parser.add_argument("--variants", nargs="?", const="", default=None,
                        help="compare service variants (NAME=value,...;NAME=value) with the defaults; "
                             "alone: the built-in list")
    parser.add_argument("--rounds", type=int, default=3, help="with --variants")
    parser.add_argument("--duration", type=int, default=15, help="seconds of measured load, with --variants")
    args = parser.parse_args()
    if args.variants is not None:
        compare(args.variants or None, args.rounds, args.requests, args.duration, args.out)
        return

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
