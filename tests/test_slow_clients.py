"""Slow clients against the real `cifar-serve` on loopback: a thousand
connections that trickle their headers or their bodies delay no normal
client, and are closed after SERVE_HEADER_TIMEOUT_S and SERVE_BODY_TIMEOUT_S;
an oversized body is a 413 in the service's format, chunked or not
(serve/front.py). Counts and times are bounded: 1,000 connections, ~30 s."""

import json
import os
import resource
import socket
import time

import pytest
import requests

from helpers import PROBE, ServeProcess
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


def open_slow(port: int, count: int, body: bool) -> list[socket.socket]:
    """`count` connections that have sent part of a request: the request line and one header
    line, or whole headers that announce a body and a few bytes of it."""
    head = b"POST /v1/models/cifar10:predict HTTP/1.1\r\nHost: x\r\n"
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    conns = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(head)
        conns.append(conn)
    return conns


def trickle(conns: list[socket.socket], body: bool) -> None:
    """One more header line, or one more byte of body, on every connection still open."""
    for conn in conns:
        try:
            conn.sendall(b" " if body else b"X-Slow: 1\r\n")
        except OSError:
            pass


def closed(conn: socket.socket) -> bool:
    """Whether the server has closed this connection (anything it sent first is read and dropped)."""
    conn.settimeout(0.01)
    try:
        while True:
            if not conn.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def timed(call) -> tuple[float, int]:
    start = time.monotonic()
    status = call().status_code
    return time.monotonic() - start, status


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * SLOW)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_slow_connections_delay_no_normal_client_and_are_closed(service, many_files):
    opened = time.monotonic()
    headers = open_slow(service.port, SLOW // 2, body=False)
    bodies = open_slow(service.port, SLOW // 2, body=True)
    try:
        latencies = []
        # About 4 s with all of them held and kept trickling, which is what holds gunicorn's threads.
        for _ in range(8):
            trickle(headers, body=False)
            trickle(bodies, body=True)
            latencies.append(timed(lambda: requests.get(service.url + "/healthz", timeout=10)))
            latencies.append(timed(lambda: requests.post(service.url + "/v1/models/cifar10:predict",
                                                         data=PREDICT, timeout=10,
                                                         headers={"Content-Type": "application/json"})))
            time.sleep(0.5)
        assert all(status == 200 for _, status in latencies), latencies
        assert max(seconds for seconds, _ in latencies) < 1.0, latencies
        # Headers still arriving after SERVE_HEADER_TIMEOUT_S (6 s since each connection opened) are cut
        # off, trickle or not; a body that pauses longer than SERVE_BODY_TIMEOUT_S (4 s) too.
        while time.monotonic() - opened < 7:
            trickle(headers, body=False)
            time.sleep(0.5)
        time.sleep(4.5)
        assert sum(map(closed, headers)) == len(headers)
        assert sum(map(closed, bodies)) == len(bodies)
    finally:
        for conn in headers + bodies:
            conn.close()
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
