"""Whatever the model store holds (versions the service may not read, corrupt
ones, an S3 endpoint that does not answer), the real `cifar-serve` answers
/healthz (200) and /readyz (503, saying why in a few words) within a second; a
version that cannot be loaded is refused once, logged by path and version with
its cause, and the previous one keeps serving; a good version published later
is served."""

import errno
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests

from helpers import WEIGHTS, ServeProcess, garbage_graph, publish_copy, wait_until
from serve.settings import Settings

# Root reads anything; without these capabilities it reads what its owner and mode allow, as an unprivileged
# user does (which cannot run here: the interpreter lives under /root, mode 0700).
UNPRIVILEGED = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
OTHER_USER = 10001


def run_unprivileged() -> tuple[str, ...]:
    """The command prefix under which files this test makes unreadable are unreadable."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run the service unable to read a file")
    probe = subprocess.run([*UNPRIVILEGED, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE: {probe.stderr.strip()}")
    return UNPRIVILEGED


def unreadable(version_dir):
    """As a version the job wrote as another user into a folder of mode 0700."""
    if os.geteuid() == 0:
        shutil.chown(version_dir, OTHER_USER, OTHER_USER)
    version_dir.chmod(0o700 if os.geteuid() == 0 else 0o000)


def no_variables(version_dir):
    shutil.rmtree(version_dir / "variables")


def answers_fast(url: str) -> requests.Response:
    """GET url, failing the test unless it answers within a second."""
    started = time.monotonic()
    answer = requests.get(url, timeout=1)
    assert time.monotonic() - started < 1
    return answer


def not_ready_saying(svc, *reasons: str) -> None:
    """/healthz 200 and /readyz 503 within a second each, saying `reasons` (in any order)."""
    assert answers_fast(svc.url + "/healthz").status_code == 200
    ready = answers_fast(svc.url + "/readyz")
    assert ready.status_code == 503, ready.text
    assert sorted(ready.json()["reason"].split("; ")) == sorted(reasons), ready.json()


def served_version(svc):
    ready = answers_fast(svc.url + "/readyz")
    return ready.status_code == 200 and ready.json()["version"]


@pytest.fixture
def store(tmp_path):
    """A model base the service, run without root's privileges, can reach."""
    tmp_path.chmod(0o755)
    tmp_path.parent.chmod(0o755)  # pytest makes its per-user folder 0700
    return tmp_path / "cifar10"


@pytest.fixture
def service(tmp_path):
    started = []

    def start(*args, env=None, prefix=()):
        env = {**os.environ, "SERVE_POLL_SECONDS": "0.2", "SERVE_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
        started.append(ServeProcess(*args, env=env, command=(*prefix, sys.executable, "-m", "serve")))
        # Up once it answers anything: TensorFlow's import comes first in every worker.
        wait_until(lambda: _answers(started[-1].url + "/healthz"), timeout=120, what="cifar-serve to answer")
        return started[-1]

    yield start
    for svc in started:
        svc.stop()


def _answers(url):
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def polls(seconds=2.0):
    time.sleep(seconds)  # ten polls at SERVE_POLL_SECONDS=0.2


@pytest.mark.slow
def test_an_unreadable_version_leaves_health_answering_and_later_versions_are_served(store, exported_model,
                                                                                      service):
    prefix = run_unprivileged()
    publish_copy(store, exported_model, unreadable)
    svc = service("--model-uri", str(store), "--workers", "2", prefix=prefix)
    wait_until(lambda: "version 1" in (requests.get(svc.url + "/readyz", timeout=1).json().get("reason") or ""),
               timeout=60, what="the reason to name version 1")
    for _ in range(5):
        not_ready_saying(svc, "version 1 refused: its files cannot be served")
        polls(0.4)

    publish_copy(store, exported_model)
    wait_until(lambda: served_version(svc) == 2, timeout=120, what="version 2 to be served")
    publish_copy(store, exported_model, unreadable)
    polls()
    assert served_version(svc) == 2  # the version before an unreadable one keeps serving
    svc.stop(drain=True)
    out = svc.output()
    for version in (1, 3):
        told = [line for line in out.splitlines() if f"refused cifar10 version {version} " in line]
        assert len(told) == 1 and str(store / str(version)) in told[0] and "Permission denied" in told[0], out


@pytest.mark.slow
def test_corrupt_versions_are_refused_once_by_path_and_a_good_one_is_served_after(store, exported_model, service):
    publish_copy(store, exported_model, garbage_graph)
    publish_copy(store, exported_model, no_variables)
    svc = service("--model-uri", str(store), "--workers", "2")
    wait_until(lambda: "version 1" in (requests.get(svc.url + "/readyz", timeout=1).json().get("reason") or ""),
               timeout=60, what="the reason to name version 1")
    refused = "version {} refused: its files cannot be served"
    wait_until(lambda: "version 2" in (requests.get(svc.url + "/readyz", timeout=1).json().get("reason") or ""),
               timeout=60, what="the reason to name version 2")
    not_ready_saying(svc, refused.format(1), refused.format(2))
    polls()
    not_ready_saying(svc, refused.format(1), refused.format(2))

    publish_copy(store, exported_model)
    wait_until(lambda: served_version(svc) == 3, timeout=120, what="version 3 to be served")
    publish_copy(store, exported_model, garbage_graph)
    polls()
    assert served_version(svc) == 3
    svc.stop(drain=True)
    out = svc.output()
    for version, cause in ((1, "tensorflow.SavedModel"), (2, "variables"), (4, "tensorflow.SavedModel")):
        told = [line for line in out.splitlines() if f"refused cifar10 version {version} " in line]
        assert len(told) == 1 and str(store / str(version)) in told[0] and cause in told[0], out


@pytest.mark.slow
def test_an_s3_endpoint_that_does_not_answer_leaves_health_answering(service):
    from helpers import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    svc = service("--model-uri", "s3://models/cifar10", "--workers", "1",
                  env={"AWS_ENDPOINT_URL_S3": nowhere, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    wait_until(lambda: requests.get(svc.url + "/readyz", timeout=1).json().get("reason") == "model store unreachable",
               timeout=60, what="the store to be unreachable")
    polls()
    not_ready_saying(svc, "model store unreachable")
    svc.stop(drain=True)
    told = [line for line in svc.output().splitlines()
            if "listing cifar10 versions under s3://models/cifar10 failed" in line]
    assert len(told) == 1 and "EndpointConnectionError" in told[0], svc.output()


def test_a_version_missing_s3_files_is_refused_by_uri_in_the_log_and_in_short_on_readyz(s3, tmp_path, exported_model,
                                                                                        make_app, caplog):
    import boto3

    from common import layout

    client = boto3.client("s3")
    root = exported_model / "1"
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != WEIGHTS):
        client.upload_file(str(path), s3, f"models/cifar10/1/{path.relative_to(root).as_posix()}")
    # Published whole as far as its marker says, which lists WEIGHTS, never uploaded.
    client.put_object(Bucket=s3, Key=f"models/cifar10/1/{layout.MARKER}", Body=layout.manifest(root))
    settings = Settings(model_uri=f"s3://{s3}/models/cifar10", poll_seconds=0.1, cache_dir=str(tmp_path))
    c = make_app(settings).test_client()
    wait_until(lambda: "refused" in (c.get("/readyz").json.get("reason") or ""))
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json["reason"] == "version 1 refused: its files cannot be served"
    told = [r.getMessage() for r in caplog.records if "refused cifar10 version 1" in r.getMessage()]
    assert len(told) == 1 and f"s3://{s3}/models/cifar10/1/{WEIGHTS} is listed" in told[0], told
    assert c.get("/healthz").status_code == 200


def test_a_full_model_cache_is_told_once_by_path_and_version_and_tried_again(tmp_path, exported_model, monkeypatch,
                                                                               caplog, make_app):
    from serve import store as model_store

    store = tmp_path / "cifar10"
    publish_copy(store, exported_model)
    attempts = []
    real = model_store.local_path

    def full(base, version, cache_dir):
        attempts.append(version)
        # Each attempt downloads into a fresh temporary folder, which the message names.
        raise OSError(errno.ENOSPC, "No space left on device", f"{cache_dir}/.download-{len(attempts)}/x")

    monkeypatch.setattr(model_store, "local_path", full)
    c = make_app(Settings(model_uri=str(store), poll_seconds=0.05)).test_client()
    wait_until(lambda: len(attempts) >= 10, what="ten attempts")
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json["reason"] == "loading version 1 failed"
    told = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert len(told) == 1 and f"version 1 from {store / '1'}" in told[0], told
    monkeypatch.setattr(model_store, "local_path", real)  # space freed: the next poll loads it
    wait_until(lambda: c.get("/readyz").status_code == 200)
