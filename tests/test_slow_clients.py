"""Slow clients against the real `cifar-serve` on loopback: a thousand
connections that trickle their headers or their bodies delay no normal
client, and are closed after SERVE_HEADER_TIMEOUT_S and SERVE_BODY_TIMEOUT_S;
an oversized body is a 413 in the service's format, chunked or not
(serve/front.py). Counts and times are bounded: 1,000 connections, ~30 s."""

import json
import os
import signal
import time

import pytest
import requests

from helpers import PROBE, ServeProcess, SlowClients, timed_status
from serve import front

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(front.nginx() is None, reason="needs Debian's nginx-light package (nginx)")]

SLOW = 1000
PREDICT = json.dumps({"instances": [PROBE[0].tolist()]})


@pytest.fixture(scope="module")
def service(exported_model):
    service = ServeProcess("--model-uri", str(exported_model), "--workers", "2", "--host", "127.0.0.1",
                           env={**os.environ, "SERVE_HEADER_TIMEOUT_S": "6", "SERVE_BODY_TIMEOUT_S": "4",
                                "SERVE_MAX_BODY_BYTES": str(1024 * 1024)})
    service.wait_ready(timeout=120)
    yield service
    service.stop()


def test_a_thousand_slow_connections_delay_no_normal_client_and_are_closed(service):
    opened = time.monotonic()
    headers = SlowClients(service.port, SLOW // 2, body=False)
    bodies = SlowClients(service.port, SLOW // 2, body=True)
    try:
        latencies = []
        # About 4 s with all of them held and kept trickling, which is what holds gunicorn's threads.
        for _ in range(8):
            headers.trickle()
            bodies.trickle()
            latencies.append(timed_status(lambda: requests.get(service.url + "/healthz", timeout=10)))
            latencies.append(timed_status(lambda: requests.post(
                service.url + "/v1/models/cifar10:predict", data=PREDICT, timeout=10,
                headers={"Content-Type": "application/json"})))
            time.sleep(0.5)
        assert all(status == 200 for _, status in latencies), latencies
        assert max(seconds for seconds, _ in latencies) < 1.0, latencies
        # Headers still arriving after SERVE_HEADER_TIMEOUT_S (6 s since each connection opened) are cut
        # off, trickle or not; a body that pauses longer than SERVE_BODY_TIMEOUT_S (4 s) too.
        while time.monotonic() - opened < 7:
            headers.trickle()
            time.sleep(0.5)
        time.sleep(4.5)
        assert headers.closed() == len(headers.conns)
        assert bodies.closed() == len(bodies.conns)
    finally:
        headers.close()
        bodies.close()
    assert requests.get(service.url + "/healthz", timeout=5).status_code == 200


def chunks(data: bytes, size: int = 65536):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_a_413_in_the_services_format_with_the_true_limit(service, chunked):
    body = b"\x89PNG" + bytes(2 * 1024 * 1024)
    answer = requests.post(service.url + "/predict", data=chunks(body) if chunked else body, timeout=30,
                           headers={"Content-Type": "image/png"})
    assert answer.status_code == 413
    assert answer.json() == {"error": f"the body is larger than {1024 * 1024} bytes"}


def test_nginx_answers_in_the_services_error_format(service):
    # A request line longer than nginx's buffers: refused by nginx before the service sees it.
    answer = requests.get(service.url + "/v1/models/" + "a" * 10000, timeout=10)
    assert answer.status_code == 414
    assert answer.headers["Content-Type"] == "application/json"
    assert "error" in answer.json()
    assert answer.headers["Server"] == "nginx"  # and no version


def test_nginx_lines_are_the_services_own_in_its_format_and_redacted(exported_model):
    service = ServeProcess("--model-uri", str(exported_model), "--workers", "1", "--host", "127.0.0.1",
                           env={**os.environ, "SERVE_LOG_FORMAT": "json", "SERVE_MAX_BODY_BYTES": "1048576"})
    try:
        service.wait_ready(timeout=120)
        # nginx logs a body it refuses, quoting the request line, query string and all.
        answer = requests.post(service.url + "/predict?token=SECRET28", data=bytes(2 * 1024 * 1024), timeout=30,
                               headers={"Content-Type": "image/png"})
        assert answer.status_code == 413
    finally:
        service.proc.send_signal(signal.SIGTERM)
        service.proc.wait(timeout=60)
        service.stop(drain=True)
    lines = [json.loads(line) for stream, line in service.lines if line.strip()]  # every line JSON
    refused = [line for line in lines if line["logger"] == "serve.nginx" and "too large body" in line["message"]]
    assert refused and "token=***" in refused[0]["message"]
    assert "SECRET28" not in service.output()
