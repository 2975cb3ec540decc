"""What a hostile client (or a curious one) gets from the service (issue 28):
no credential, endpoint, bucket or prefix from an open route or in a log
line; a key setting that holds no key refused at start; metric series that
no request can multiply; the same 413 for a body too large however it is
framed; versions in URLs as ASCII digits only."""

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from pydantic import ValidationError

from helpers import PROBE, ServeProcess, free_port, png, wait_until
from serve.settings import Settings

SECRET, KEY_ID = "SECRETXYZ", "KEYIDQ7"
BUCKET, PREFIX = "bucket-hostile42", "prefix-hostile42"
OPEN = ["/readyz", "/ping", "/healthz", "/v2/health/ready", "/v2/health/live", "/v2/models/cifar10/ready",
        "/v2/models/cifar10/versions/1/ready", "/metrics", "/openapi.json", "/"]


@pytest.fixture
def unreachable_store(monkeypatch):
    """An S3 endpoint with credentials in its URL, where nothing listens; the environment for it; what must
    never be read from outside."""
    port = free_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://{KEY_ID}:{SECRET}@127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env, (SECRET, KEY_ID, BUCKET, PREFIX, f"127.0.0.1:{port}")


def test_open_routes_give_a_short_reason_and_nothing_of_the_store(unreachable_store, make_app, tmp_path):
    _, hidden = unreachable_store
    c = make_app(Settings(model_uri=f"s3://{BUCKET}/{PREFIX}/cifar10", poll_seconds=0.1, cache_dir=str(tmp_path),
                          api_keys=["k1"])).test_client()
    wait_until(lambda: "unreachable" in (c.get("/readyz").json.get("reason") or ""), timeout=10,
               what="the store to fail")
    for route in ("/readyz", "/ping"):
        answer = c.get(route)
        assert answer.status_code == 503 and answer.json["reason"] == "model store unreachable", answer.json
    for route in OPEN:
        body = c.get(route).get_data(as_text=True)
        assert not [word for word in hidden if word in body], (route, body)
    assert c.get("/v2/models/cifar10/ready").status_code == 503  # open, and not ready


def logged_service(env: dict, log_format: str) -> str:
    """Everything a real cifar-serve, unable to reach its store, writes until it is stopped."""
    svc = ServeProcess("--model-uri", f"s3://{BUCKET}/{PREFIX}/cifar10", "--workers", "2",
                       env={**os.environ, **env, "SERVE_LOG_FORMAT": log_format, "SERVE_POLL_SECONDS": "0.2",
                            "SERVE_API_KEYS": "k1"})
    try:
        wait_until(lambda: "unreachable" in _get(svc.url + "/readyz"), timeout=120, what="the store to fail")
        for route in OPEN:
            body = _get(svc.url + route)
            assert SECRET not in body and BUCKET not in body, (route, body)
        # A query string that is a credential, in the access log.
        _get(svc.url + f"/healthz?X-Amz-Signature={SECRET}")
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(timeout=60)
    finally:
        svc.stop(drain=True)
    return svc.output()


def _get(url: str) -> str:
    import requests

    try:
        return requests.get(url, timeout=5).text
    except requests.RequestException:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_secret_is_in_no_line_the_service_writes(unreachable_store, log_format):
    env, _ = unreachable_store
    out = logged_service(env, log_format)
    assert SECRET not in out and KEY_ID not in out, out
    assert f"s3://{BUCKET}/{PREFIX}/cifar10" in out  # the detail is in the log, redacted
    assert "***@127.0.0.1" in out or "EndpointConnectionError" in out, out


@pytest.mark.parametrize("value", [",", " ", ",, ,"])
def test_a_key_setting_that_holds_no_key_is_an_error(monkeypatch, value):
    monkeypatch.setenv("SERVE_API_KEYS", value)
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_or_empty_key_setting_means_no_keys(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("SERVE_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("SERVE_API_KEYS", value)
    assert Settings().api_keys == []
    monkeypatch.setenv("SERVE_API_KEYS", " k1 ,, k2 ")
    assert Settings().api_keys == ["k1", "k2"]


@pytest.mark.slow
def test_cifar_serve_exits_2_naming_the_key_setting_that_holds_none():
    answer = subprocess.run([sys.executable, "-m", "serve", "--model-uri", "/nowhere"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "SERVE_API_KEYS": ", ,"})
    assert answer.returncode == 2 and "cifar-serve: error: SERVE_API_KEYS:" in answer.stderr, answer.stderr


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_startup_line_says_auth_is_on_and_counts_the_keys(tmp_path, log_format):
    svc = ServeProcess("--model-uri", str(tmp_path), "--workers", "1",
                       env={**os.environ, "SERVE_API_KEYS": "first-key-77,second-key-88",
                            "SERVE_LOG_FORMAT": log_format})
    try:
        wait_until(lambda: "cifar-serve" in svc.output() and "auth" in svc.output(), timeout=60,
                   what="the startup line")
    finally:
        svc.stop(drain=True)
    line = next(line for _, line in svc.lines if '"auth"' in line)
    assert "first-key-77" not in svc.output() and "second-key-88" not in svc.output()
    settings = json.loads(line.split(": ", 1)[1]) if log_format == "text" else json.loads(line)["settings"]
    assert settings["auth"] == "2 API keys"


def test_readiness_routes_are_open_and_the_rest_of_v2_models_is_not(client, exported_model, make_app):
    c = make_app(Settings(model_uri=str(exported_model), poll_seconds=0.2, api_keys=["k1"])).test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200)
    assert c.get("/v2/models/cifar10/ready").json == {"name": "cifar10", "ready": True}
    assert c.get("/v2/models/cifar10/versions/1/ready").status_code == 200
    assert c.get("/v2/models/cifar10").status_code == 401
    assert c.get("/v2/models/cifar10/versions/1").status_code == 401
    assert c.get("/v2/models/cifar10", headers={"X-API-Key": "k1"}).status_code == 200
    for wrong in ("k", "k1 ", "k10", "K1", ""):
        assert c.get("/v2/models/cifar10", headers={"X-API-Key": wrong}).status_code == 401, wrong


@pytest.fixture(scope="module")
def keyed(exported_model):
    from serve.app import create_app

    app = create_app(Settings(model_uri=str(exported_model), poll_seconds=0.2, api_keys=["k1"]))
    client = app.test_client()
    wait_until(lambda: client.get("/readyz").status_code == 200)
    yield client
    app.extensions["predictor"].backend.close()


# The key anywhere but X-API-Key or Authorization: Bearer, or a guarded route reached another way:
# what the review tried, and what must stay a 401.
MISPLACED = [
    ("POST", "/v1/models/cifar10:predict?api_key=k1", {}),
    ("POST", "/v1/models/cifar10:predict?X-API-Key=k1", {}),
    ("POST", "/v1/models/cifar10:predict", {"Api-Key": "k1"}),
    ("POST", "/v1/models/cifar10:predict", {"X-Api-Token": "k1"}),
    ("POST", "/v1/models/cifar10:predict", {"Authorization": "Basic k1"}),
    ("POST", "/v1/models/cifar10:predict", {"Authorization": "k1x"}),
    ("POST", "/v1/models/cifar10:predict", {"Cookie": "X-API-Key=k1"}),
    ("POST", "/v1/models/cifar10%3Apredict", {}),
    ("POST", "/v1%2Fmodels/cifar10:predict", {}),
    ("POST", "/v1/models/./cifar10:predict", {}),
    ("HEAD", "/v1/models/cifar10", {}),
    ("GET", "/v1/models/cifar10/metadata", {}),
    ("PUT", "/v1/models/cifar10:predict", {}),
    ("POST", "/invocations", {}),
    ("POST", "/predict", {}),
    ("POST", "/v2/models/cifar10/infer", {}),
]


@pytest.mark.parametrize("method, path, headers", MISPLACED)
def test_a_key_anywhere_else_or_a_guarded_route_reached_another_way_is_401(keyed, method, path, headers):
    body = json.dumps({"instances": PROBE[:1].tolist()})
    answer = keyed.open(path, method=method, headers=headers, data=body, content_type="application/json")
    assert answer.status_code == 401, (method, path, headers, answer.status_code)


@pytest.mark.parametrize("version", ["01", "00", "１", "١", "1_0", "+1", "99999999999999999999999"])
def test_a_version_is_ascii_digits_without_leading_zeros(client, version):
    for path in (f"/v1/models/cifar10/versions/{version}", f"/v1/models/cifar10/versions/{version}/metadata",
                 f"/v2/models/cifar10/versions/{version}", f"/v2/models/cifar10/versions/{version}/ready"):
        answer = client.get(path)
        assert answer.status_code == 404, (path, answer.status_code)
    answer = client.post(f"/v1/models/cifar10/versions/{version}:predict", json={"instances": PROBE[:1].tolist()})
    assert answer.status_code in (404, 405)
    assert client.get("/v1/models/cifar10/versions/1").status_code == 200
    assert client.get("/v2/models/cifar10/versions/1/ready").status_code == 200


def test_invented_methods_all_count_as_one_series(client):
    client.open("/healthz", method="INVENTED")  # the one series they all count in
    client.get("/metrics")
    before = client.get("/metrics").get_data(as_text=True)
    for i in range(200):
        client.open("/healthz", method=f"INVENTED{i}")
    after = client.get("/metrics").get_data(as_text=True)
    assert "INVENTED" not in after and 'method="other"' in after
    assert len(after) - len(before) < 100


def test_a_multipart_body_with_many_parts_is_refused_for_its_parts(client):
    fields = {f"f{i}": "x" for i in range(1000)}
    answer = client.post("/predict", data={**fields, "file": (io.BytesIO(png(PROBE[0])), "a.png")},
                         content_type="multipart/form-data")
    assert answer.status_code == 413 and "parts" in answer.json["error"], answer.json
    assert "10485760" not in answer.json["error"]
    one = client.post("/predict", data={"file": (io.BytesIO(png(PROBE[0])), "a.png")},
                      content_type="multipart/form-data")
    assert one.status_code == 200


def test_a_chunked_body_over_the_limit_is_413_in_the_test_client_too(client):
    big = io.BytesIO(b"\x89PNG" + b"\0" * (11 * 2**20))
    answer = client.post("/predict", input_stream=big, content_type="image/png")
    assert answer.status_code == 413 and "10485760" in answer.json["error"], answer.json
    small = client.post("/predict", input_stream=io.BytesIO(png(PROBE[0])), content_type="image/png")
    assert small.status_code == 200


def chunked(port: int, path: str, content_type: str, body: bytes) -> tuple[int, dict]:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length), in 64 KiB chunks; status and JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", content_type)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for i in range(0, len(body), 65536):
            piece = body[i:i + 65536]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # answered before it was all sent
        pass
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def gunicorn(exported_model):
    """The real cifar-serve, one worker, serving the shared export; gunicorn itself, with no front
    that would read the request before it."""
    svc = ServeProcess("--model-uri", str(exported_model), "--workers", "1",
                       env={**os.environ, "SERVE_POLL_SECONDS": "0.5", "SERVE_FRONT": "none"})
    svc.wait_ready(timeout=120)
    yield svc
    svc.stop()


@pytest.mark.slow
def test_chunked_bodies_over_the_limit_get_413_under_gunicorn(gunicorn):
    limit = 10 * 2**20
    status, answer = chunked(gunicorn.port, "/predict", "image/png", b"\x89PNG" + b"\0" * (limit + 2**20))
    assert status == 413 and str(limit) in answer["error"], answer
    instances = json.dumps({"instances": [PROBE[0].tolist()] * 40}).encode()
    body = instances[:-2] + b" " * (limit + 2**20) + instances[-2:]  # valid JSON, 11 MiB
    status, answer = chunked(gunicorn.port, "/v1/models/cifar10:predict", "application/json", body)
    assert status == 413 and str(limit) in answer["error"], answer
    status, answer = chunked(gunicorn.port, "/predict", "image/png", png(PROBE[0]))
    assert status == 200 and answer["predictions"]
    status, answer = chunked(gunicorn.port, "/v1/models/cifar10:predict", "application/json", instances)
    assert status == 200 and len(answer["predictions"]) == 40


def letters(n: int) -> str:
    """n in base 26, written A-Z: a method name any server (nginx too) passes on."""
    out = ""
    while True:
        n, digit = divmod(n, 26)
        out = chr(ord("A") + digit) + out
        if not n:
            return out


@pytest.mark.slow
def test_invented_methods_leave_metrics_the_same_size_under_gunicorn(gunicorn):
    def exposition() -> str:
        return _get(gunicorn.url + "/metrics")

    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=30) as sock:
        stream = sock.makefile("rb")
        for i in range(2001):
            if i == 1:  # after the first, which makes the one series they all count in
                exposition()
                before = len(exposition())
            sock.sendall(f"MADEUP{letters(i)} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status = stream.readline()
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            stream.read(length)
            assert status.split()[1] == b"405", status
    after = exposition()
    assert "MADEUP" not in after and len(after) - before < 100, (before, len(after))
