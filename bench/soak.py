"""Soak: the real `cifar-serve` (in-process backend, under gunicorn) driven
at a fixed request rate for minutes, with a new model version published in
the middle so that a hot reload happens under load.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 50] [--workers N] [--reload-at-minute 5] [--out FILE]

Requests are single-image TF Serving REST :predict calls, each on a
connection of its own. They are open-loop: request i is due at
start + i / rate whatever became of the earlier ones, and its latency runs
from that due time, so a stall of the service shows up as latency (and as
requests in flight), never as a lower rate. Every minute gets a row:
requests due in it, answers by status, connection errors, p50/p99/max
latency, how late the client itself sent a request (were it late, the
latencies would be partly its own), the resident memory (VmRSS) of each
gunicorn worker at the minute's end and their total, and which model
versions answered (`X-Model-Version`). Two checks end the run, and fail it
with exit status 1: no request failed, and no request sent after the first
answer from the new version was answered by the old one. The version is
published at --reload-at-minute by renaming a complete export into the
model base, as the job publishes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import concurrent.futures
import datetime
import http.client
import json
import math
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
PATH = "/v1/models/cifar10:predict"
MEMORY_EVERY_S = 5.0

from bench.serve_memory import gunicorn_workers  # noqa: E402  (needs ROOT on sys.path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_rss(master: int) -> dict[int, float]:
    """VmRSS (what `ps` and `top` call RSS) of each of gunicorn's workers, in MiB."""
    found = {}
    for pid in gunicorn_workers(master):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # a worker that gunicorn just replaced
        found[pid] = round(int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024, 1)
    return found


def publish(net, sample, export_dir: Path) -> Path:
    """A complete new version, written outside the model base; the caller
    renames it in, as the job's export does (the service never sees half a version)."""
    from job import export

    _, uri = export.export(net, str(export_dir), "cifar10", {"test_accuracy": 0.9}, sample)
    return Path(uri)


def start(base: Path, workers: int | None, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [str(BIN / "cifar-serve"), "--model-uri", str(base), "--host", "127.0.0.1", "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            sys.exit(f"soak: the service never became ready; its log ends:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # gunicorn's master and its workers; they drain first
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def predict(port: int, body: bytes, due: float, t0: float) -> dict:
    """One request; times in seconds since the run's start."""
    sent = time.monotonic() - t0
    record = {"due": due, "sent": sent, "status": None, "version": None, "error": None}
    # A new connection per request, as a load balancer without keep-alive sends them:
    # gunicorn's workers share one listening socket and the kernel gives each new
    # connection to whichever worker accepts first, so every request may land on
    # any worker. A kept-alive connection stays with one worker for its whole
    # life, which would hide a worker that answers with another version or stalls
    # from every client not pinned to it. On loopback the handshake costs well under
    # a millisecond.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", PATH, body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        record["status"], record["version"] = answer.status, answer.getheader("X-Model-Version")
    except (OSError, http.client.HTTPException) as exc:
        record["error"] = type(exc).__name__
    finally:
        conn.close()
    record["answered"] = time.monotonic() - t0
    return record


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: a latency some request really had."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def per_minute(records: list[dict], memory: list[tuple[float, dict[int, float]]], seconds: float) -> list[dict]:
    """One row per minute of the run (the last one shorter when `seconds` is not whole
    minutes). A request counts in the minute it was due, and its latency runs from that
    due time to its answer. Memory is the last sample taken in the minute; the last
    minute's is the one taken after the run's last answer."""
    rows, count = [], math.ceil(seconds / 60)
    for m in range(count):
        lo, hi = 60 * m, min(60 * (m + 1), seconds)
        mine = [r for r in records if lo <= r["due"] < hi]
        latencies = [(r["answered"] - r["due"]) * 1000 for r in mine if r["error"] is None]
        samples = [rss for t, rss in memory if lo <= t and (t < hi or m == count - 1)]
        workers = samples[-1] if samples else {}
        rows.append({
            "minute": m + 1, "from_s": lo, "to_s": hi, "requests": len(mine),
            "statuses": dict(sorted(Counter(r["status"] for r in mine if r["error"] is None).items())),
            "connection_errors": sum(r["error"] is not None for r in mine),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies, default=None),
            # The client's own health: how late a request left after its due time.
            "max_send_lag_ms": max(((r["sent"] - r["due"]) * 1000 for r in mine), default=None),
            "rss_mib": {str(pid): v for pid, v in sorted(workers.items())},
            "rss_total_mib": round(sum(workers.values()), 1) if workers else None,
            "versions": dict(sorted(Counter(r["version"] for r in mine if r["version"]).items())),
        })
    return rows


def checks(records: list[dict], new_version: str) -> dict:
    failed = [r for r in records if r["error"] is not None or r["status"] != 200]
    new = [r["answered"] for r in records if r["version"] == new_version]
    first_new = min(new, default=None)
    # Sent, not due: a request due earlier but sent after the first new answer must get the new version too.
    late = [] if first_new is None else [r for r in records if r["sent"] > first_new
                                         and r["version"] not in (None, new_version)]
    return {
        "failed_requests": len(failed),
        "zero_failed": not failed,
        "first_new_answer_s": first_new,
        "old_answers_after_first_new": len(late),
        # Without any answer from the new version the reload was never seen: that fails too.
        "never_backwards": first_new is not None and not late,
    }


def machine() -> dict:
    import tensorflow as tf

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"^Model name:\s+(.+)$", lscpu, re.M)
    meminfo = Path("/proc/meminfo").read_text()
    return {"cores": len(os.sched_getaffinity(0)), "cpu": model.group(1).strip() if model else "unknown",
            "mem_gib": round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1),
            "python": platform.python_version(), "tensorflow": tf.__version__, "kernel": platform.release()}


def command_line() -> str:
    # What changes the service's behaviour without a flag is part of the command.
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith("SERVE_") or k == "GUNICORN_CMD_ARGS"]
    return " ".join([*env, os.path.relpath(sys.executable, ROOT), shlex.join(sys.argv)])


def markdown(rows: list[dict]) -> str:
    def ms(v):
        return "—" if v is None else f"{v:,.1f}"

    lines = ["| minute | requests | answers by status | connection errors | p50 ms | p99 ms | max ms "
             "| client lag max ms | RSS per worker MiB | RSS total MiB | versions answered |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        span = f"{r['minute']}" if r["to_s"] - r["from_s"] == 60 else f"{r['minute']} ({r['to_s'] - r['from_s']:g} s)"
        statuses = ", ".join(f"{s}: {n:,}" for s, n in r["statuses"].items()) or "—"
        versions = ", ".join(f"v{v}: {n:,}" for v, n in r["versions"].items()) or "—"
        rss = ", ".join(f"{v:,.0f}" for v in r["rss_mib"].values()) or "—"
        total = "—" if r["rss_total_mib"] is None else f"{r['rss_total_mib']:,.0f}"
        lines.append(f"| {span} | {r['requests']:,} | {statuses} | {r['connection_errors']:,} | {ms(r['p50_ms'])} "
                     f"| {ms(r['p99_ms'])} | {ms(r['max_ms'])} | {ms(r['max_send_lag_ms'])} | {rss} | {total} "
                     f"| {versions} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=50, help="requests per second, sent on schedule")
    parser.add_argument("--workers", type=int, help="SERVE_WORKERS (default: the service's own)")
    parser.add_argument("--reload-at-minute", type=float, default=5,
                        help="when the new version appears in the model base")
    parser.add_argument("--clients", type=int, default=128,
                        help="client threads: enough to keep sending on schedule through a stall")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    if not 0 < args.reload_at_minute < args.minutes:
        parser.error("--reload-at-minute must fall inside the run")

    from common.tfquiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    import numpy as np

    from job import model

    command, host = command_line(), machine()
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    body = json.dumps({"instances": pixels.tolist()}).encode()
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="soak-") as tmpdir:
        tmp = Path(tmpdir)
        base = tmp / "models" / "cifar10"
        publish(model.build("simple_cnn"), pixels, tmp / "models")
        # Version 2 is exported now, not mid-run: the export's TensorFlow work in this
        # process would compete with the clients for the cores and show as latency.
        staged = publish(model.build("simple_cnn"), pixels, tmp / "staging")
        log_path = tmp / "serve.log"
        proc, port = start(base, args.workers, log_path)
        try:
            warm = predict(port, body, 0.0, time.monotonic())
            if warm["status"] != 200 or warm["version"] != "1":
                sys.exit(f"soak: the first request got {warm}; the log ends:\n{log_path.read_text()[-3000:]}")
            workers = gunicorn_workers(proc.pid)
            print(f"soak: {len(workers)} workers {workers}, {args.rate:g} requests/s for {args.minutes:g} min, "
                  f"new version at minute {args.reload_at_minute:g}", file=sys.stderr, flush=True)
            started_utc = datetime.datetime.now(datetime.UTC)
            load_before = os.getloadavg()
            t0 = time.monotonic()
            done = threading.Event()
            memory: list[tuple[float, dict[int, float]]] = []

            def sample_memory():
                while True:
                    memory.append((time.monotonic() - t0, worker_rss(proc.pid)))
                    if done.wait(MEMORY_EVERY_S - (time.monotonic() - t0) % MEMORY_EVERY_S):
                        memory.append((time.monotonic() - t0, worker_rss(proc.pid)))  # after the last answer
                        return

            reload = {"at_s": args.reload_at_minute * 60, "published_s": None}

            def publish_new():
                os.rename(staged, base / "2")
                reload["published_s"] = time.monotonic() - t0

            sampler = threading.Thread(target=sample_memory, daemon=True)
            sampler.start()
            timer = threading.Timer(reload["at_s"], publish_new)
            timer.daemon = True  # an interrupted run must not wait for it
            timer.start()
            futures = []
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                for i in range(math.ceil(seconds * args.rate)):
                    due = i / args.rate
                    wait = t0 + due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    futures.append(pool.submit(predict, port, body, due, t0))
                    if i and i % max(1, round(60 * args.rate)) == 0:
                        print(f"soak: minute {i / args.rate / 60:g} done", file=sys.stderr, flush=True)
                records = [f.result() for f in futures]
            timer.join()
            done.set()
            sampler.join()
            load_after = os.getloadavg()
            switches = re.findall(r"every worker switched from (.*) to version (\d+)", log_path.read_text())
        finally:
            stop(proc)

    rows = per_minute(records, memory, seconds)
    result = checks(records, "2")
    statuses = Counter(r["status"] for r in records if r["error"] is None)
    errors = Counter(r["error"] for r in records if r["error"] is not None)
    table = markdown(rows)
    print(f"Command: `{command}`")
    print(f"Machine: {host['cores']} CPU cores (`os.sched_getaffinity`), {host['cpu']} (`lscpu`), "
          f"{host['mem_gib']} GiB; Python {host['python']}, TensorFlow {host['tensorflow']}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
          f"Started {started_utc:%Y-%m-%d %H:%M} UTC.")
    first_new = result["first_new_answer_s"]
    print(f"Workers: {len(workers)}; version 2 published at {reload['published_s']:.1f} s, first answered at "
          f"{'never' if first_new is None else f'{first_new:.1f} s'}; switches logged: {switches}.\n")
    print(table)
    print(f"\nTotal: {len(records):,} requests; answers by status: "
          f"{', '.join(f'{s}: {n:,}' for s, n in sorted(statuses.items())) or 'none'}; "
          f"connection errors: {', '.join(f'{e}: {n:,}' for e, n in sorted(errors.items())) or 'none'}.")
    print(f"{'PASS' if result['zero_failed'] else 'FAIL'}: zero failed requests ({result['failed_requests']:,} failed)")
    print(f"{'PASS' if result['never_backwards'] else 'FAIL'}: no answer from version 1 after the first from "
          f"version 2 ({result['old_answers_after_first_new']:,} such answers"
          f"{'' if result['first_new_answer_s'] is not None else '; version 2 never answered'})")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": command, "machine": host, "started_utc": started_utc.isoformat(timespec="seconds"),
            "load_average": {"before": load_before, "after": load_after}, "workers": len(workers),
            "rate": args.rate, "minutes": args.minutes, "reload": reload, "switches": switches,
            "totals": {"requests": len(records), "statuses": {str(s): n for s, n in sorted(statuses.items())},
                       "connection_errors": dict(errors)},
            "checks": result, "minutes_table": rows, "markdown": table}, indent=2))
    sys.exit(0 if result["zero_failed"] and result["never_backwards"] else 1)


if __name__ == "__main__":
    main()
