"""Slow clients: what a normal client waits while 1,000 connections trickle
their headers or bodies, with nginx in front of gunicorn (the default where
nginx is installed, serve/front.py) and with gunicorn alone (SERVE_FRONT=none,
the service before it), side by side in one run.

    .venv/bin/python bench/slow_clients_bench.py [--slow 1000] [--seconds 15] [--rounds 2] [--out FILE]

Each round starts each service in turn (`cifar-serve` with its defaults,
simple_cnn in process, as bench/serve_bench.py starts it), then sends
normal requests one after another for `--seconds` (GET /healthz and a
batch-1 TF Serving REST predict, alternating, each on a new connection,
each given 5 s): first alone, then while `--slow` connections are held
(half sending a header line, half a body byte, each second). Reported per
service and phase: requests answered and timed out, and the answered ones'
p50, p99 and worst latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import serve_bench  # noqa: E402  (bench/, for how a service is started and stopped)
from helpers import SlowClients  # noqa: E402

FRONTS = {"nginx in front (default)": "nginx", "gunicorn alone (SERVE_FRONT=none)": "none"}


def normal_requests(url: str, body: bytes, seconds: float) -> dict:
    """Requests one after another for `seconds`: how many were answered, timed out, and how fast."""
    answered, failed = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent = time.monotonic()
        try:
            if len(answered) % 2:
                status = requests.get(url + "/healthz", timeout=5).status_code
            else:
                status = requests.post(url + serve_bench.PATH, data=body, timeout=5,
                                       headers={"Content-Type": "application/json"}).status_code
            if status != 200:
                raise RuntimeError(f"status {status}")
            answered.append((time.monotonic() - sent) * 1000)
        except (requests.RequestException, RuntimeError):
            failed += 1
    ms = sorted(answered) or [float("nan")]
    return {"answered": len(answered), "failed": failed, "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "max_ms": ms[-1]}


def held(port: int, count: int):
    """`count` slow connections, kept trickling every second until the returned stop() is called."""
    clients = [SlowClients(port, count // 2, body=False), SlowClients(port, count - count // 2, body=True)]
    stopping = threading.Event()

    def keep_trickling():
        while not stopping.wait(1.0):
            for c in clients:
                c.trickle()

    thread = threading.Thread(target=keep_trickling, daemon=True)
    thread.start()

    def stop():
        stopping.set()
        thread.join()
        for c in clients:
            c.close()
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()

    import numpy as np

    from job import export, model

    results: dict[str, dict[str, list[dict]]] = {name: {"alone": [], "slow": []} for name in FRONTS}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        export.export(model.build("simple_cnn"), str(tmp / "export"), "cifar10", {}, np.zeros((4, 32, 32, 3), np.uint8))
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).tolist()
        body = json.dumps({"instances": [image]}).encode()
        (tmp / "body.json").write_bytes(body)
        for r in range(args.rounds):
            for name, front in FRONTS.items():
                proc, port = serve_bench.start("service", tmp / "export" / "cifar10", tmp, {"SERVE_FRONT": front})
                url = f"http://127.0.0.1:{port}"
                try:
                    results[name]["alone"].append(normal_requests(url, body, args.seconds))
                    stop_slow = held(port, args.slow)
                    try:
                        time.sleep(1)  # every slow connection has sent its first bytes and been taken
                        results[name]["slow"].append(normal_requests(url, body, args.seconds))
                    finally:
                        stop_slow()
                finally:
                    serve_bench.stop(proc)
                print(f"round {r + 1} {name}: {results[name]}", file=sys.stderr, flush=True)

    print("| service | phase | answered | timed out (5 s) | p50 ms | p99 ms | worst ms |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for name, phases in results.items():
        for phase, runs in phases.items():
            label = "alone" if phase == "alone" else f"{args.slow:,} slow connections held"
            answered, failed = sum(x["answered"] for x in runs), sum(x["failed"] for x in runs)
            p50, p99, worst = (statistics.median(x[k] for x in runs) for k in ("p50_ms", "p99_ms", "max_ms"))
            print(f"| {name} | {label} | {answered} | {failed} | {p50:.1f} | {p99:.1f} | {worst:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"slow": args.slow, "seconds": args.seconds, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
