"""common/s3.py: the one S3 client policy the job and the service share, and
how an s3:// URI splits. The policy is read off the client boto3 built; the
retry count is also counted at a real (local) endpoint that always answers 503."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common import s3

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch):
    """No S3 settings but test credentials and a region: each test sets what it needs."""
    for name in s3.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_the_client_retries_in_standard_mode_five_times_and_times_out(env):
    config = s3.client().meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
    assert config.s3 == {"addressing_style": "auto"}


def test_aws_max_attempts_sets_the_attempts(env):
    env.setenv("AWS_MAX_ATTEMPTS", "2")
    assert s3.client().meta.config.retries == {"mode": "standard", "total_max_attempts": 2}


def test_an_unreadable_aws_max_attempts_says_so(env):
    env.setenv("AWS_MAX_ATTEMPTS", "five")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS='five'"):
        s3.client()


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_a_custom_endpoint_is_addressed_by_path(env, variable):
    env.setenv(variable, "http://127.0.0.1:9000")
    client = s3.client()
    assert client.meta.endpoint_url == "http://127.0.0.1:9000"
    assert client.meta.config.s3 == {"addressing_style": "path"}


def test_one_client_per_set_of_settings(env):
    first = s3.client()
    assert s3.client() is first
    env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    other = s3.client()
    assert other is not first and other.meta.endpoint_url == "http://127.0.0.1:9000"
    env.delenv("AWS_ENDPOINT_URL_S3")
    assert s3.client() is first


class _Overloaded(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 SlowDown, and counts them."""

    def do_GET(self):
        self.server.requests += 1
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_request_is_tried_aws_max_attempts_times_in_all(env):
    from botocore.exceptions import ClientError

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Overloaded)
    server.requests = 0
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        env.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_port}")
        env.setenv("AWS_MAX_ATTEMPTS", "3")
        with pytest.raises(ClientError, match="SlowDown"):
            s3.client().list_objects_v2(Bucket="bucket", Prefix="models/")
    finally:
        server.shutdown()
        server.server_close()
    assert server.requests == 3  # the first try and two retries, as boto3 reads AWS_MAX_ATTEMPTS


@pytest.mark.parametrize("uri, parts", [
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://bucket/models/cifar10", ("bucket", "models/cifar10")),
    ("s3://bucket/models/cifar10/", ("bucket", "models/cifar10")),
    ("s3://bucket/data/cifar-10-binary.tar.gz", ("bucket", "data/cifar-10-binary.tar.gz")),
    ("s3://", ("", "")),
])
def test_split(uri, parts):
    assert s3.split(uri) == parts


def test_the_job_and_the_service_use_this_client_and_no_other(env):
    from job import storage

    assert storage.backend("s3://bucket/ckpt").client is s3.client()
    assert storage.S3Storage.split is s3.split
    made = [f"{path.relative_to(ROOT)}:{n}" for package in ("common", "job", "serve")
            for path in sorted((ROOT / package).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if 'boto3.client("s3"' in line]
    assert len(made) == 1 and made[0].startswith("common/s3.py:"), made


def test_importing_it_loads_no_boto3():
    # Making a client is what needs boto3; the service's start-up and the job's CLI import this module.
    code = "import sys, common.s3, common.images; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
