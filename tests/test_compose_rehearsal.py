"""`docker compose up`, rehearsed without Docker: each compose service's own
command and environment, run as a local process, with moto's S3 server on
127.0.0.1 in MinIO's place, a local HTTP server in the place of the
canonical CIFAR-10 archive's host (serving a 500-image slice of the real
data set), and a TF Serving stand-in (a gRPC server built from
tensorflow-serving-api's services) in TF Serving's. Ends with a prediction
through the service, as a user's first request would, and a second `up`
that neither downloads nor trains."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import tensorflow as tf
import yaml

from helpers import REAL_SMALL, ServeProcess, compose_config, free_port
from tfserving_standin import FakeTFServing, start_server

pytestmark = pytest.mark.slow  # each test trains and starts cifar-serve

ROOT = Path(__file__).resolve().parents[1]


def service_env(service: dict, s3_endpoint: str) -> dict:
    """The service's compose environment, with MinIO's address swapped for the local endpoint."""
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    if "AWS_ENDPOINT_URL_S3" in env:
        env["AWS_ENDPOINT_URL_S3"] = s3_endpoint
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CIFAR_", "SERVE_"))}, **env}


def fresh_bucket(s3_endpoint: str, env: dict) -> boto3.client:
    """buckets: `mc mb --ignore-existing local/cifar`, done through the S3 API; emptied, as a first `up` finds it."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket="cifar")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="cifar"):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket="cifar", Key=obj["Key"])
    return s3


def run_dataset(service: dict, env: dict, origin: str, md5: str, workdir: Path) -> subprocess.CompletedProcess:
    """The dataset service: its entrypoint (a shell) and command exactly as compose resolves them, in a
    fresh container's empty cache, with `cifar-job` on PATH fetching the canonical archive from `origin`
    (the canonical URL swapped for a local one, as MinIO's address is for moto's)."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "cifar-job"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom job import cifar10\n"
                      f"cifar10.CANONICAL_URL, cifar10.CANONICAL_MD5 = {origin!r}, {md5!r}\n"
                      "from job.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    # `docker compose config` keeps compose's `$$` escape; the container's shell sees `$`.
    argv = [*service["entrypoint"], *(arg.replace("$$", "$") for arg in service["command"])]
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(ROOT),
           "CIFAR_DATA__CACHE_DIR": str(workdir / "cache")}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def origin(server):
    """The canonical archive's host, here: serves the real 500-image slice and counts requests."""
    server.files["/cifar-10-binary.tar.gz"] = REAL_SMALL.read_bytes()
    server.archive = server.url + "/cifar-10-binary.tar.gz"
    server.md5 = hashlib.md5(REAL_SMALL.read_bytes()).hexdigest()
    return server


@pytest.mark.timeout(600)
def test_compose_services_rehearsed_as_local_processes(s3_server, origin, tmp_path):
    services = compose_config()["services"]
    env = {name: service_env(s, s3_server) for name, s in services.items()}
    # Short enough for CI: the compose file reads these from the environment too.
    env["train"].update(CIFAR_TRAIN__EPOCHS="1", CIFAR_DATA__VALIDATION_SIZE="50", CIFAR_TRAIN__BATCH_SIZE="50",
                        CIFAR_DATA__CACHE_DIR=str(tmp_path / "train-cache"))
    s3 = fresh_bucket(s3_server, env["train"])

    # dataset: downloads the archive once, verified, and stores it where train reads it.
    done = run_dataset(services["dataset"], env["dataset"], origin.archive, origin.md5, tmp_path / "dataset-1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["train"] == 300 and origin.requests == 1
    assert "100 %" in done.stderr and "stored " in done.stderr
    stored = s3.get_object(Bucket="cifar", Key="data/cifar-10-binary.tar.gz")["Body"].read()
    assert stored == REAL_SMALL.read_bytes()

    # train: the image's entrypoint is cifar-job; the real images come from MinIO, not the internet.
    train_cmd = [sys.executable, "-m", "job", *services["train"]["command"]]
    done = subprocess.run(train_cmd, cwd=ROOT, env=env["train"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "data: 250 train, 50 validation, 200 test examples (cifar10" in done.stdout
    assert "exported model version 1 to s3://cifar/models/cifar10/1" in done.stdout
    assert origin.requests == 1

    # model-sync: its entrypoint and command, with the /models volume at a local folder.
    models = tmp_path / "models"
    sync = [str(models) + a[len("/models"):] if a.startswith("/models") else a
            for a in services["model-sync"]["command"]]
    done = subprocess.run([sys.executable, "-m", "serve", "sync", *sync, "--once"], cwd=ROOT,
                          env=env["model-sync"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version_dir = models / "cifar10" / "1"
    assert (version_dir / "saved_model.pb").is_file()

    # tfserving: the stand-in serves what the sync put in its model folder.
    fake = FakeTFServing(str(version_dir))
    server, port = start_server(fake)

    # serve: its compose environment, TF Serving's address swapped for the stand-in's.
    serve_env = {**env["serve"], "SERVE_TFSERVING_ADDRESS": f"127.0.0.1:{port}", "SERVE_POLL_SECONDS": "0.5"}
    # The container listens on 8080 (the image's SERVE_PORT); here, on a free port.
    assert services["serve"]["ports"][0]["target"] == 8080
    service = ServeProcess("--host", "127.0.0.1", env=serve_env, cwd=ROOT)
    proc, url = service.proc, service.url
    try:
        service.wait_ready()
        pixels = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
        answer = requests.post(f"{url}/v1/models/cifar10:predict", json={"instances": pixels.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        expected = fake.signatures["serving_default"](images=tf.constant(pixels))["probabilities"].numpy()
        np.testing.assert_allclose([p["probabilities"] for p in answer.json()["predictions"]], expected, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        server.stop(grace=None)

    # A second `docker compose up`: the dataset service finds the archive in MinIO and sends no
    # request (a new container, an empty cache); train finds the run finished instead of training again.
    again = run_dataset(services["dataset"], env["dataset"], origin.archive, origin.md5, tmp_path / "dataset-2")
    assert again.returncode == 0, again.stderr
    assert "s3://cifar/data/cifar-10-binary.tar.gz already holds an object" in again.stderr
    assert again.stdout == "" and origin.requests == 1
    again = subprocess.run(train_cmd, cwd=ROOT, env=env["train"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert yaml.safe_load(s3.get_object(Bucket="cifar", Key="checkpoints/config.yaml")["Body"].read())[
        "export"]["uri"] == "s3://cifar/models"


@pytest.mark.timeout(600)
def test_compose_up_with_synthetic_data_runs_offline(s3_server, tmp_path, monkeypatch):
    # `CIFAR_DATA__SOURCE=synthetic docker compose up`: compose hands the variable to its services.
    monkeypatch.setenv("CIFAR_DATA__SOURCE", "synthetic")
    services = compose_config()["services"]
    env = {name: service_env(s, s3_server) for name, s in services.items()}
    fresh_bucket(s3_server, env["train"])

    # No network: the canonical archive's host is a port nothing listens on.
    offline = f"http://127.0.0.1:{free_port()}/cifar-10-binary.tar.gz"
    done = run_dataset(services["dataset"], env["dataset"], offline, "0" * 32, tmp_path / "dataset")
    assert done.returncode == 0, done.stderr
    assert "nothing to fetch" in done.stdout and not (tmp_path / "dataset" / "cache").exists()

    env["train"].update(CIFAR_TRAIN__EPOCHS="1", CIFAR_TRAIN__BATCH_SIZE="50", CIFAR_DATA__SYNTHETIC__TRAIN_SIZE="1000",
                        CIFAR_DATA__SYNTHETIC__TEST_SIZE="200", CIFAR_DATA__VALIDATION_SIZE="100")
    done = subprocess.run([sys.executable, "-m", "job", *services["train"]["command"]], cwd=ROOT, env=env["train"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "data: 900 train, 100 validation, 200 test examples (synthetic" in done.stdout
    assert "exported model version 1 to s3://cifar/models/cifar10/1" in done.stdout
