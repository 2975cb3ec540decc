import http.server
import io
import os
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def small_overrides(tmp_path, **extra) -> list[str]:
    """A run small enough for a unit test: a few seconds on two cores."""
    values = {
        "data.synthetic.train_size": 1200,
        "data.synthetic.test_size": 300,
        "data.validation_size": 200,
        "train.batch_size": 32,
        "train.epochs": 2,
        "checkpoint.every_steps": 10,
        "checkpoint.uri": str(tmp_path / "ckpt"),
        "export.uri": str(tmp_path / "export"),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def run_job():
    """Train in-process; returns (Result, console output)."""
    from job import train
    from job.config import load_config
    from job.report import Console

    def run(overrides: list[str]):
        out = io.StringIO()
        result = train.run(load_config(None, overrides), Console("text", stream=out))
        return result, out.getvalue()

    return run


SECRET = "s3cr3t-never-printed-0123456789"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server mode), in MinIO's place."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """boto3 pointed at the local endpoint the way compose points it at MinIO; a fresh bucket."""
    import uuid

    import boto3

    for name, value in {"AWS_ENDPOINT_URL_S3": s3_server, "AWS_ACCESS_KEY_ID": "testing-key",
                        "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def wait_until(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def url_ready(url: str) -> bool:
    """Whether GET url answers 200 now (a server still starting is not an error)."""
    import requests

    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def free_port() -> int:
    """A port nothing listens on now (a server started next can still lose it to a race, rarely)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves .files[path] (bytes); counts every GET in .requests. A body in
    .truncated is announced whole but cut off halfway."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.send_length = True
        self.requests = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes, so a length is optional

    def do_GET(self):
        self.server.requests += 1
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.server.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in self.server.truncated else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server standing in for a data set's host (there is no internet here)."""
    httpd = ArchiveServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
