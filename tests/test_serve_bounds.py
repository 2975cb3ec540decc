"""Issue 28, items 2 and 3: whatever clients send, a worker's memory stays
bounded (images too large to need are refused from their header, the rest
decode within a per-worker budget) and a request's deadline holds (past it,
the work stops and the client gets a 504 saying where)."""

import base64
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from common import images
from helpers import ServeProcess, flat_png, wait_until
from serve import deadline
from serve.batching import Batcher
from serve.budget import Budget
from serve.settings import Settings

V1 = "/v1/models/cifar10:predict"
# 6300x6300 (39.7 megapixels) was under the old 40-megapixel cap and cost a worker 300 MiB.
HUGE = flat_png(6300, 6300)


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def refused_for_size(response) -> None:
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert "6300x6300" in error and "4096x4096" in error, error


def test_a_png_declaring_more_than_is_decoded_is_refused_naming_its_size_and_the_limit(client):
    refused_for_size(client.post("/predict", data={"file": (io.BytesIO(HUGE), "huge.png")}))
    refused_for_size(client.post("/predict", data=HUGE, content_type="image/png"))
    refused_for_size(client.post(V1, json={"instances": [b64(HUGE)]}))
    refused_for_size(client.post(V1, json={"signature_name": "predict_image_bytes", "instances": [b64(HUGE)]}))


def test_a_phone_sized_jpeg_is_decoded_reduced_not_refused():
    out = io.BytesIO()
    Image.new("L", (8000, 6000), 200).save(out, format="JPEG")  # 48 megapixels, as a phone takes them
    pixels = images.decode(out.getvalue())
    assert pixels.shape == (32, 32, 3) and abs(int(pixels.mean()) - 200) <= 2


def test_the_decoding_budget_makes_an_image_wait_and_lets_one_larger_than_it_through_alone():
    budget = Budget(100)
    with budget.reserve(250):  # larger than the budget: alone
        assert budget.used == 250
    entered, release = threading.Event(), threading.Event()

    def second():
        with budget.reserve(60):
            entered.set()
            release.wait(5)

    with budget.reserve(60):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.2)
        assert not entered.is_set()  # 60 + 60 > 100: it waits
    assert entered.wait(5) and budget.used == 60
    release.set()
    waiter.join()
    assert budget.used == 0


def test_waiting_for_the_budget_ends_at_the_deadline():
    budget = Budget(100)
    with budget.reserve(100):
        deadline.start(0.2)
        started = time.monotonic()
        with pytest.raises(deadline.Expired, match="waited for decoding memory"):
            with budget.reserve(1):
                pass
        assert time.monotonic() - started < 1
    deadline._deadline.set(None)


def test_the_batcher_does_not_run_a_queued_request_past_its_deadline():
    calls = []

    def model(x):
        calls.append(len(x))
        time.sleep(0.3)
        return x, "v1"

    batcher = Batcher(model, max_batch_size=4, batch_timeout_ms=0, max_queue=8)
    first = threading.Thread(target=batcher.predict, args=(np.ones((1, 1)), 5))
    first.start()
    time.sleep(0.05)  # the first batch runs: the next request waits in the queue past its deadline
    with pytest.raises(deadline.Expired, match="waited for the model"):
        batcher.predict(np.ones((1, 1)), 0.1)
    first.join()
    time.sleep(0.1)
    assert calls == [1]


@pytest.mark.slow
def test_a_request_past_its_deadline_stops_decoding_and_gets_504_saying_where(exported_model, make_app):
    app = make_app(Settings(model_uri=str(exported_model), poll_seconds=0.2, request_timeout_s=0.5))
    client = app.test_client()
    wait_until(lambda: client.get("/readyz").status_code == 200, what="the app to be ready")
    body = {"instances": [b64(flat_png(3000, 3000))] * 64}  # ~0.15 s each to decode: ~10 s in all
    started = time.monotonic()
    response = client.post(V1, json=body)
    assert time.monotonic() - started < 2.5
    assert response.status_code == 504, response.get_json()
    assert response.get_json()["error"].startswith("no answer within 0.5s: the deadline passed before")


# --- against the real service: gunicorn, 2 workers of 16 threads -------------------------------------------

# Just under what the service decodes (4096x4096); ~50 KB each.
NEAR_LIMIT = flat_png(4090, 4090)
# Measured (docs/benchmarks.md, Hostile clients): 8 such uploads at once raised a worker up to 642 MiB
# above idle before the decoding budget, 129 MiB with its 128 MiB; 3 s later it held 0.3 MiB more than
# idle with glibc's malloc set to return freed images (serve/budget.py), up to 132 MiB more without.
PEAK_ABOVE_IDLE_MIB = 192
AFTER_ABOVE_IDLE_MIB = 32


@pytest.fixture
def service(tmp_path, exported_model):
    started = []

    def start(**env):
        started.append(ServeProcess("--model-uri", str(exported_model), "--workers", "2", "--threads", "16",
                                    env={**os.environ, "SERVE_DRAIN_SECONDS": "0", **env}))
        started[-1].wait_ready(timeout=120)
        return started[-1]

    yield start
    for s in started:
        s.stop()


def status(pid: int, field: str) -> float:
    """A /proc/PID/status figure (VmRSS, VmHWM), in MiB."""
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def cpu_seconds(pids: list[int]) -> float:
    return sum(sum(int(f) for f in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
               for pid in pids) / os.sysconf("SC_CLK_TCK")


def post(url: str, data: bytes, kind: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": kind}), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_eight_near_limit_images_at_once_keep_each_workers_memory_within_its_bound(service):
    from concurrent.futures import ThreadPoolExecutor

    svc = service()
    small = flat_png(32, 32)
    with ThreadPoolExecutor(8) as pool:  # every worker warm: each request on a new connection
        assert set(pool.map(lambda _: post(svc.url + "/predict", small, "image/png")[0], range(40))) == {200}
    pids = svc.worker_pids()
    idle = {pid: status(pid, "VmRSS") for pid in pids}
    for pid in pids:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from now
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(svc.url + "/predict", NEAR_LIMIT, "image/png")[0], range(8)))
    assert answers == [200] * 8
    for pid in pids:
        assert status(pid, "VmHWM") - idle[pid] < PEAK_ABOVE_IDLE_MIB, (pid, idle, status(pid, "VmHWM"))
    time.sleep(3)
    for pid in pids:
        assert status(pid, "VmRSS") - idle[pid] < AFTER_ABOVE_IDLE_MIB, (pid, idle, status(pid, "VmRSS"))


@pytest.mark.slow
def test_a_body_that_takes_longer_than_the_deadline_gets_504_at_it_and_stops_using_the_cpu(service):
    svc = service(SERVE_REQUEST_TIMEOUT_S="2")
    body = json.dumps({"instances": [b64(NEAR_LIMIT)] * 64}).encode()  # ~30 s of decoding on 2 cores
    pids = svc.worker_pids()
    started = time.monotonic()
    code, answer = post(svc.url + V1, body, "application/json")
    took = time.monotonic() - started
    assert code == 504 and took < 5, (code, took, answer)
    assert answer["error"].startswith("no answer within 2s: the deadline passed"), answer
    used = cpu_seconds(pids)
    time.sleep(2)
    assert cpu_seconds(pids) - used < 0.5  # nothing left decoding
    code, answer = post(svc.url + "/predict", flat_png(32, 32), "image/png")
    assert code == 200


def test_a_request_leaves_no_deadline_behind_on_its_thread(client):
    # The test client, like a gunicorn thread, runs many requests on one thread: work done on it
    # later, outside any request, must not find the last request's (long expired) deadline.
    assert client.get("/healthz").status_code == 200
    assert deadline.at() is None
