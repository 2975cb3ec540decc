"""The forwarder: `cifar-serve` with SERVE_BACKEND=tfserving in front of the
TF Serving stand-in (tests/tfserving_standin.py, a gRPC server on
tensorflow-serving-api's services with the SavedModel in it), its memory and
its single-image throughput, for two checkouts side by side (say, main's
code before the forwarder shed TensorFlow, and this one).

    .venv/bin/python bench/forwarder_bench.py before=/tmp/before-fwd after=. [--rounds 2] [--duration 20]
        [--out FILE]

One stand-in serves an untrained simple_cnn for the whole run. For each
round and each checkout in turn, the service starts alone from that
checkout's code (this interpreter and its libraries, the checkout first on
PYTHONPATH; gunicorn alone, SERVE_FRONT=none, the default worker and thread
counts), is asked /readyz until ready, answers 300 requests on new
connections until every worker has answered (serve_memory.py's), then
serve_bench.py's load: wrk, 32 connections, one single-image TF Serving
REST body, 3 s warm-up and `--duration` s measured. /proc is read for the
master and each worker once ready and after the load (MiB, as
serve_memory.py reads it); CPU ms per request counts gunicorn's processes
only, not the stand-in's. Medians over rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import serve_bench, serve_memory  # noqa: E402


def start_standin(base: Path, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = serve_memory.free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), "--port", str(port),
                             "--model_base_path", str(base), "--poll_seconds", "0.5"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=(tmp / "standin.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while b"serving cifar10 version" not in (tmp / "standin.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"forwarder_bench: the stand-in did not start:\n{(tmp / 'standin.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, port


def start_service(tree: Path, address: str, tmp: Path) -> tuple[subprocess.Popen, str, list[int], Path]:
    port = serve_memory.free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp / f"serve-{tree.name}-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(tree), "SERVE_BACKEND": "tfserving", "SERVE_TFSERVING_ADDRESS": address,
           "SERVE_MODEL_NAME": "cifar10", "SERVE_FRONT": "none", "SERVE_DRAIN_SECONDS": "0",
           "GUNICORN_CMD_ARGS": "--access-logformat 'pid=%(p)s \"%(r)s\" %(s)s'"}
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=tree,
                            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                serve_memory.stop(proc)
            sys.exit(f"forwarder_bench: {tree} never became ready; its log ends:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, url, serve_memory.gunicorn_workers(proc.pid), log_path


def measure(tree: Path, address: str, duration: int, tmp: Path) -> dict:
    started = time.monotonic()
    proc, url, pids, log_path = start_service(tree, address, tmp)
    try:
        ready_s = time.monotonic() - started
        ready = [serve_memory.memory(pid) for pid in pids]
        serve_memory.every_worker_answers(url, pids, 300, log_path)
        port = int(url.rsplit(":", 1)[1])
        serve_bench.wrk(port, 3, tmp / "post.lua", 32)  # warm-up: connections, thread pools
        cpu = serve_bench.group_cpu_seconds(proc.pid)
        run = serve_bench.wrk(port, duration, tmp / "post.lua", 32)
        run["cpu_ms_per_request"] = (serve_bench.group_cpu_seconds(proc.pid) - cpu) * 1000 / run["requests"]
        master, warm = serve_memory.memory(proc.pid), [serve_memory.memory(pid) for pid in pids]
    finally:
        serve_memory.stop(proc)
    return {**run, "ready_s": ready_s, "workers": len(pids), "master": master, "ready": ready, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="LABEL=PATH: a checkout whose serve/ and common/ to run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=20, help="seconds per measured wrk run")
    parser.add_argument("--out", help="write every run as JSON")
    args = parser.parse_args()
    trees = {label: Path(path).resolve() for label, path in (t.split("=", 1) for t in args.trees)}

    import numpy as np

    from job import export, model

    runs: dict[str, list[dict]] = {label: [] for label in trees}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        export.export(model.build("simple_cnn"), str(tmp / "export"), "cifar10", {}, np.zeros((4, 32, 32, 3), np.uint8))
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).tolist()
        (tmp / "body.json").write_text(json.dumps({"instances": [image]}))
        (tmp / "post.lua").write_text(serve_bench.LUA.format(body=tmp / "body.json"))
        standin, port = start_standin(tmp / "export" / "cifar10", tmp)
        try:
            for r in range(args.rounds):  # A B A B: drift on a shared machine lands on every tree alike
                for label, tree in trees.items():
                    run = measure(tree, f"127.0.0.1:{port}", args.duration, tmp)
                    runs[label].append(run)
                    print(f"round {r + 1} {label}: {run['rps']:.0f} req/s, p99 {run['p99_ms']:.1f} ms, worker RSS "
                          f"{[w['VmRSS'] for w in run['warm']]}, master {run['master']['VmRSS']}",
                          file=sys.stderr, flush=True)
        finally:
            serve_memory.stop(standin)

    def med(values):
        return statistics.median(values)

    print("| code | workers | master RSS | worker RSS ready | worker RSS warm | worker USS | service total "
          "| ready after (s) | req/s (median) | per round | p50 ms | p99 ms | CPU ms/request | errors |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    summary = {}
    for label, rs in runs.items():
        workers = [w for run in rs for w in run["warm"]]
        s = summary[label] = {
            "workers": rs[0]["workers"], "master_rss": med(run["master"]["VmRSS"] for run in rs),
            "rss_ready": med(w["VmRSS"] for run in rs for w in run["ready"]),
            "rss_warm": med(w["VmRSS"] for w in workers), "uss": med(w["Uss"] for w in workers),
            # master and workers' own pages, plus what the workers share once
            "total_mib": med(run["master"]["Uss"] + sum(w["Uss"] for w in run["warm"])
                             + max(w["VmRSS"] - w["Uss"] for w in run["warm"]) for run in rs),
            **{k: med(run[k] for run in rs) for k in ("ready_s", "rps", "p50_ms", "p99_ms", "cpu_ms_per_request")},
            "rps_rounds": [round(run["rps"]) for run in rs], "errors": sum(run["errors"] for run in rs)}
        print(f"| {label} ({trees[label]}) | {s['workers']} | {s['master_rss']:.0f} | {s['rss_ready']:.0f} "
              f"| {s['rss_warm']:.0f} | {s['uss']:.0f} | {s['total_mib']:.0f} | {s['ready_s']:.1f} | {s['rps']:,.0f} "
              f"| {', '.join(f'{v:,}' for v in s['rps_rounds'])} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} "
              f"| {s['cpu_ms_per_request']:.2f} | {s['errors']} |")
    print("(MiB; worker figures are medians over every worker of every round)")
    if args.out:
        Path(args.out).write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "summary": summary,
                                              "runs": runs, "duration_s": args.duration}, indent=2))


if __name__ == "__main__":
    main()
