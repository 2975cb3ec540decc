"""The service as a load balancer sees it, through the real `cifar-serve`
under gunicorn with several workers: ready means every worker, a restarted
worker takes no request before it can answer, versions switch for all
workers at once and never go backwards, and SIGTERM loses no request."""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from helpers import ServeProcess, pixels, publish, url_ready, wait_until
from job import model
from serve import rollout

PIXELS = pixels(1, seed=5)
BODY = json.dumps({"instances": PIXELS.tolist()})


@pytest.fixture(scope="module")
def net():
    return model.build("simple_cnn")


class Service(ServeProcess):
    """`cifar-serve` under gunicorn as a subprocess, its output collected."""

    def __init__(self, base, workers, **env):
        super().__init__("--model-uri", str(base), "--workers", str(workers),
                         env={**os.environ, "SERVE_POLL_SECONDS": "0.3", **env})

    def predict(self) -> tuple[int, str | None]:
        """One request on a connection of its own, as from a load balancer: (status, version)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", "/v1/models/cifar10:predict", BODY, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            return answer.status, answer.getheader("X-Model-Version")
        finally:
            conn.close()


@pytest.fixture
def service(tmp_path, net):
    """Start `cifar-serve` with `workers` workers on `tmp_path / "cifar10"`, which
    holds version 1, and wait until it says it is ready."""
    started = []

    def start(workers, **env):
        publish(tmp_path / "cifar10", net, PIXELS)
        started.append(Service(tmp_path / "cifar10", workers, **env))
        started[-1].wait_ready(timeout=120)
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.mark.slow
def test_with_four_workers_every_request_after_the_first_ready_succeeds(service):
    svc = service(4)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: svc.predict(), range(160)))
    assert answers == [(200, "1")] * 160
    # Four workers loaded it; one switch made it the service's version.
    out = svc.output()
    assert out.count("version 1 loaded in this worker") == 4
    assert out.count("every worker switched") == 1


@pytest.mark.slow
def test_restarted_workers_take_no_request_before_they_hold_the_model(service):
    # gunicorn restarts each worker after 15 to 20 requests: every few requests a worker is loading.
    svc = service(2, GUNICORN_CMD_ARGS="--max-requests 15 --max-requests-jitter 5")
    answers = [svc.predict() for _ in range(120)]
    assert answers == [(200, "1")] * 120
    assert svc.output().count("Autorestarting worker") >= 4


@pytest.mark.slow
def test_a_version_switch_under_load_never_goes_backwards(tmp_path, net, service):
    svc = service(3)
    answers = []  # (sent, answered, status, version)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            status, version = svc.predict()
            answers.append((sent, time.monotonic(), status, version))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for c in clients:
        c.start()
    time.sleep(1)
    publish(tmp_path / "cifar10", net, PIXELS, tamper=True)  # version 2: refused by every worker, told once
    wait_until(lambda: "refused cifar10 version 2" in svc.output(), timeout=120)
    publish(tmp_path / "cifar10", net, PIXELS)
    wait_until(lambda: any(a[3] == "3" for a in answers), timeout=120)
    time.sleep(1)
    stop.set()
    for c in clients:
        c.join()
    assert {a[2] for a in answers} == {200}
    first_new = min(answered for _, answered, _, version in answers if version == "3")
    # No request sent after any client had an answer from version 3 was answered by version 1.
    late = [a for a in answers if a[0] > first_new and a[3] != "3"]
    assert not late and sum(a[3] == "1" for a in answers) > 0
    out = svc.output()
    switches = re.findall(r"every worker switched from (.*) to version (\d+)", out)
    assert switches == [("no version", "1"), ("version 1", "3")]
    assert out.count("refused cifar10 version 2") == 1
    metrics = http.client.HTTPConnection("127.0.0.1", svc.port)
    metrics.request("GET", "/metrics")
    text = metrics.getresponse().read().decode()
    assert 'cifar_serve_model_switches_total{direction="forward"} 2.0' in text
    assert 'cifar_serve_model_versions_refused_total{reason="probe"} 1.0' in text


@pytest.mark.slow
def test_sigterm_under_load_reports_not_ready_then_answers_every_accepted_request(service):
    svc = service(2, SERVE_DRAIN_SECONDS="2")
    answers, failures = [], []
    not_ready = threading.Event()  # what a load balancer learns from /readyz

    def balancer():
        while not not_ready.is_set():
            if not url_ready(svc.url + "/readyz"):
                not_ready.set()
            time.sleep(0.2)

    def client():
        while not not_ready.is_set():
            try:
                answers.append(svc.predict()[0])
            except OSError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=balancer)] + [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len(answers) > 20)
    signalled = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert svc.proc.wait(timeout=60) == 0
    # Every request sent, including those in flight at the signal, was answered.
    assert not failures and set(answers) == {200}
    # The drain kept answering for its 2 s after readiness went.
    assert time.monotonic() - signalled >= 2
    assert "draining: not ready" in svc.output()


def test_a_switch_waits_for_every_live_worker_and_is_made_once(tmp_path):
    state = tmp_path / "state"
    me = rollout.Rollout(str(state))
    other = subprocess.Popen(["sleep", "60"])  # another live worker, still loading
    try:
        rollout._write(rollout.worker_file(state, other.pid), {"holds": [], "target": None})
        rollout._write(rollout.worker_file(state, 999_999_999), {"holds": [], "target": None})  # long dead
        me.publish(holds=[1], target=1)
        assert me.try_switch() is None and me.active() is None
        rollout._write(rollout.worker_file(state, other.pid), {"holds": [1], "target": 1})
        assert me.try_switch() == (None, rollout.Active(1, 1))
        assert me.try_switch() is None  # counted once, however many workers see the agreement
        # Workers that disagree (one has version 2 ready, the other not yet) switch nothing.
        me.publish(holds=[1, 2], target=2)
        assert me.try_switch() is None and me.active() == rollout.Active(1, 1)
        rollout._write(rollout.worker_file(state, other.pid), {"holds": [1, 2], "target": 2})
        assert me.try_switch() == (rollout.Active(1, 1), rollout.Active(2, 2))
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_serve_tf_threads_sizes_tensorflow_pools_in_every_worker(service):
    # 5: not what TensorFlow would choose itself here, unless the machine has exactly 5 cores.
    svc = service(2, SERVE_TF_THREADS="5")
    assert [svc.predict() for _ in range(8)] == [(200, "1")] * 8
    workers = svc.worker_pids()
    assert len(workers) == 2
    for pid in workers:
        names = [open(f"/proc/{pid}/task/{t}/comm").read().strip() for t in os.listdir(f"/proc/{pid}/task")]
        # TensorFlow names its inter-op pool's threads tf_Compute; it starts them once, with its runtime,
        # so a setting applied after that would have failed the worker instead.
        assert names.count("tf_Compute") == 5, names
