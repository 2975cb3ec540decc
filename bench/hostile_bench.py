"""Hostile clients: what large images cost the service's workers in memory,
and whether a request's deadline holds, on the default serving setup.

    .venv/bin/python bench/hostile_bench.py [--quick] [--side 4090] [--rounds 3] [--env NAME=value,...] [--out FILE]

The default serving setup: `cifar-serve` with its defaults on this machine
(2 workers of 16 threads on 2 cores, gthread), simple_cnn exported untrained,
in process, on 127.0.0.1 (serve_memory.start), gunicorn alone
(SERVE_FRONT=none: the workers' memory is what is measured). Each round starts the
service, has every worker answer 100 small requests (serve_memory's mix, on
new connections), then reads each worker's VmRSS and USS (idle; USS is
what the worker holds alone, serve_memory's "own"). It resets each
worker's peak (`5` to /proc/PID/clear_refs), sends 8 uploads at once to
/predict, each on its own connection, of a one-colour RGB PNG of `--side` x
`--side` pixels (~100 KB; 4090 is just under the size the service decodes,
6300 what was found to cost 300 MiB before), reads VmHWM (the peak) and,
3 s after the last answer, VmRSS (after). Then, against a second service
with SERVE_REQUEST_TIMEOUT_S=2, one TF Serving REST body of 64 such images
as `{"b64": ...}` instances: its status, seconds to answer, and the CPU
seconds its worker spent in the 3 s after the answer (0 when the deadline
stopped it). `--env` adds variables to both services (what is compared);
`--quick` is one round of 4 uploads and a 16-image body.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import serve_memory  # noqa: E402
from helpers import flat_png  # noqa: E402


def post(url: str, data: bytes, kind: str) -> tuple[int, float, str]:
    """(status, seconds, body) of one POST on a new connection."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": kind}), timeout=120) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return status, time.monotonic() - started, body.decode(errors="replace")[:200]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ 100)


def uploads(base: Path, tmp: Path, env: dict, image: bytes, count: int) -> dict:
    proc, url, pids, log_path = serve_memory.start(base, None, tmp, env)
    try:
        serve_memory.every_worker_answers(url, pids, 100, log_path)
        idle_memory = {pid: serve_memory.memory(pid) for pid in pids}
        idle = {pid: m["VmRSS"] for pid, m in idle_memory.items()}
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            answers = list(pool.map(lambda _: post(url + "/predict", image, "image/png"), range(count)))
        peak = {pid: serve_memory.memory(pid)["VmHWM"] for pid in pids}
        time.sleep(3)
        after = {pid: serve_memory.memory(pid)["VmRSS"] for pid in pids}
    finally:
        serve_memory.stop(proc)
    return {"statuses": sorted(a[0] for a in answers), "seconds": max(a[1] for a in answers),
            "answer": answers[0][2], "idle": list(idle.values()),
            "idle_uss": [m["Uss"] for m in idle_memory.values()], "peak": list(peak.values()),
            "after": list(after.values())}


def deadline(base: Path, tmp: Path, env: dict, image: bytes, count: int) -> dict:
    env = {**env, "SERVE_REQUEST_TIMEOUT_S": "2"}
    proc, url, pids, log_path = serve_memory.start(base, None, tmp, env)
    try:
        body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}] * count}).encode()
        before = {pid: cpu_seconds(pid) for pid in pids}
        status, seconds, answer = post(url + "/v1/models/cifar10:predict", body, "application/json")
        answered = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(3)
        later = {pid: cpu_seconds(pid) for pid in pids}
    finally:
        serve_memory.stop(proc)
    return {"status": status, "seconds": seconds, "answer": answer,
            "cpu_until_answer": round(sum(answered.values()) - sum(before.values()), 2),
            "cpu_after_answer": round(sum(later.values()) - sum(answered.values()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=4090)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", default="", help="NAME=value,... for the service")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    env = {"SERVE_FRONT": "none", **dict(kv.split("=", 1) for kv in args.env.split(",") if kv)}
    rounds, count, instances = (1, 4, 16) if args.quick else (args.rounds, 8, 64)

    import numpy as np

    from job import export, model

    image = flat_png(args.side, args.side)
    runs = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        export.export(model.build("simple_cnn"), str(tmp / "export"), "cifar10", {}, np.zeros((4, 32, 32, 3), np.uint8))
        base = tmp / "export" / "cifar10"
        for r in range(rounds):
            runs.append({"uploads": uploads(base, tmp, env, image, count),
                         "deadline": deadline(base, tmp, env, image, instances)})
            print(f"round {r + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    workers = [(u["idle"][i], u["peak"][i], u["after"][i]) for u in (run["uploads"] for run in runs)
               for i in range(len(u["idle"]))]
    print("| side | image | env | uploads at once | statuses | idle RSS | idle USS | peak RSS | RSS 3 s after "
          "| deadline body | status | seconds | worker CPU s after the answer |\n"
          "|---|---:|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|")
    last = runs[-1]
    print(f"| {args.side} | {len(image) / 1024:.0f} KB | {args.env or 'defaults'} | {count} "
          f"| {', '.join(map(str, last['uploads']['statuses']))} "
          f"| {statistics.median(w[0] for w in workers):.0f} "
          f"| {statistics.median(u for run in runs for u in run['uploads']['idle_uss']):.0f} "
          f"| {max(w[1] for w in workers):.0f} "
          f"| {max(w[2] for w in workers):.0f} | {instances} images "
          f"| {', '.join(str(run['deadline']['status']) for run in runs)} "
          f"| {max(run['deadline']['seconds'] for run in runs):.1f} "
          f"| {max(run['deadline']['cpu_after_answer'] for run in runs):.2f} |")
    print("(MiB per worker: idle the median, peak and after the highest, over every worker of every round)")
    record = {"machine": serve_memory.machine(), "side": args.side, "env": env, "runs": runs}
    print(json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
