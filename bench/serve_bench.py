"""Serving throughput: the service (`cifar-serve`, micro-batching) against a
plain Flask app that calls the SavedModel once per request
(bench/plain_flask_app.py), both under gunicorn gthread with the same worker
and thread counts, with wrk sending single-image TF Serving REST requests
from 32 connections; plus the raw signature on batches of 32 in-process as
the ceiling. Each server runs alone, alternating A B A B; medians reported.

    .venv/bin/python bench/serve_bench.py [--duration 20] [--rounds 2] [--out FILE]
        [--variant SERVE_MAX_BATCH_SIZE=8,SERVE_BATCH_TIMEOUT_MS=1]   # an extra, labelled service row
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
PATH = "/v1/models/cifar10:predict"
LUA = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n' \
      'local f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'  # the body has "]]": no Lua literal


def group_cpu_seconds(pgid: int) -> float:
    """CPU time so far of every process in the server's process group (gunicorn's master and workers).

    Per request, it is the steadier measure: wrk's connections stay with the
    worker that accepted them, so how they happen to spread over the workers
    moves req/s by up to 2x from run to run, but not the work each request costs."""
    total = 0
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or one that just ended
        if int(fields[2]) == pgid:  # after ")": state, ppid, pgrp, ..., utime (12th), stime (13th)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, base: Path, tmp: Path, extra_env: dict) -> tuple[subprocess.Popen, int]:
    """Start one server alone; return it once it answers the benchmark's request with 200."""
    from serve.settings import Settings

    port, env = free_port(), {**os.environ, **extra_env}
    defaults = Settings()  # the baseline gets the service's worker/thread counts
    if kind == "service":
        cmd = [str(BIN / "cifar-serve"), "--model-uri", str(base), "--port", str(port), "--host", "127.0.0.1"]
    else:
        env["PLAIN_MODEL_DIR"] = str(max(base.iterdir(), key=lambda p: int(p.name)))
        cmd = [str(BIN / "gunicorn"), "--chdir", str(ROOT), "-k", "gthread", "-w", str(defaults.workers),
               "--threads", str(defaults.threads), "-b", f"127.0.0.1:{port}", "bench.plain_flask_app:app"]
    log_path = tmp / f"{kind}.log"
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url, body = f"http://127.0.0.1:{port}", (tmp / "body.json").read_bytes()

    def answers(path: str, data: bytes | None = None) -> bool:
        try:
            request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status == 200 and (data is None or len(json.load(r)["predictions"][0]["probabilities"]) == 10)
        except OSError:
            return False

    # The service says when it is ready (/readyz); the baseline is ready when it answers.
    deadline = time.monotonic() + 120
    while not (answers("/readyz") if kind != "baseline" else answers(PATH, body)):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not answers(PATH, body):  # the request the benchmark sends must succeed before it is timed
        if proc.poll() is None:
            stop(proc)
        sys.exit(f"serve_bench: {kind} did not answer {PATH}; its log ends:\n{log_path.read_text()[-3000:]}")
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # gunicorn's master and its worker
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4}[unit]


def wrk(port: int, seconds: int, script: Path, connections: int) -> dict:
    # --timeout 10s: wrk's default (2 s) would drop slow requests from the latency histogram.
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}{PATH}"],
                         capture_output=True, text=True, check=True).stdout
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    percentiles = out.split("Latency Distribution", 1)[1]  # not the "+/- Stdev" columns above it
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50_ms": ms(re.search(r"\s50%\s+(\S+)", percentiles).group(1)),
            "p99_ms": ms(re.search(r"\s99%\s+(\S+)", percentiles).group(1)),
            "errors": (int(non2xx.group(1)) if non2xx else 0)
            + (sum(map(int, socket_errors.groups())) if socket_errors else 0)}


def ceiling(version_dir: Path, seconds: float) -> float:
    """Images/s of the bare signature on batches of 32: what no server can beat on this machine."""
    import numpy as np
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    batch = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8))
    for _ in range(5):
        signature(images=batch)["probabilities"].numpy()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        signature(images=batch)["probabilities"].numpy()  # .numpy(): the same copy-out a server does
        n += 32
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per measured wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variant", help="SERVE_*=value,... for an extra service row with these settings")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("serve_bench: wrk is not installed (Debian/Ubuntu: apt-get install wrk)")

    import numpy as np

    from job import export, model

    # row label -> (server kind, extra environment)
    rows = {"baseline (plain Flask)": ("baseline", {}), "service (defaults)": ("service", {})}
    if args.variant:
        rows[f"service ({args.variant})"] = ("service", dict(kv.split("=", 1) for kv in args.variant.split(",")))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        _, uri = export.export(model.build("simple_cnn"), str(tmp / "export"), "cifar10", {},
                               np.zeros((4, 32, 32, 3), np.uint8))
        base = tmp / "export" / "cifar10"
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).tolist()
        (tmp / "body.json").write_text(json.dumps({"instances": [image]}))  # one identical body for all
        (tmp / "post.lua").write_text(LUA.format(body=tmp / "body.json"))
        images_per_s = ceiling(Path(uri), 10.0)  # before any server, so nothing competes with it
        results: dict[str, list[dict]] = {name: [] for name in rows}
        for r in range(args.rounds):  # A B A B: drift on a shared machine lands on every row alike
            for name, (kind, env) in rows.items():
                proc, port = start(kind, base, tmp, env)
                try:
                    wrk(port, 3, tmp / "post.lua", args.connections)  # warm-up: connections, thread pools
                    cpu = group_cpu_seconds(proc.pid)
                    run = wrk(port, args.duration, tmp / "post.lua", args.connections)
                    run["cpu_ms_per_request"] = (group_cpu_seconds(proc.pid) - cpu) * 1000 / run["requests"]
                    results[name].append(run)
                finally:
                    stop(proc)
                print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)

    summary = {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for name, runs in results.items()}
    for name, runs in results.items():
        summary[name]["errors"] = sum(run["errors"] for run in runs)  # every failed request counts, not a median
    base_rps = summary["baseline (plain Flask)"]["rps"]
    base_cpu = summary["baseline (plain Flask)"]["cpu_ms_per_request"]
    print("| server | req/s (median) | per round | p50 ms | p99 ms | errors | CPU ms/request | vs baseline (req/s) "
          "| vs baseline (CPU/request) | vs ceiling |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        rounds = ", ".join(f"{run['rps']:,.0f}" for run in results[name])
        cpu = s["cpu_ms_per_request"]
        print(f"| {name} | {s['rps']:,.0f} | {rounds} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']:.0f} "
              f"| {cpu:.2f} | {s['rps'] / base_rps:.2f}x | {base_cpu / cpu:.2f}x | {s['rps'] / images_per_s:.2f}x |")
    print(f"| ceiling: signature on batches of 32, in-process | {images_per_s:,.0f} images/s | | | | | "
          f"{1000 / images_per_s:.3f} (per image) | {images_per_s / base_rps:.2f}x | | 1.00x |")
    if args.out:
        Path(args.out).write_text(json.dumps({"ceiling_images_per_s": images_per_s, "summary": summary,
                                              "runs": results, "connections": args.connections,
                                              "duration_s": args.duration}, indent=2))


if __name__ == "__main__":
    main()
