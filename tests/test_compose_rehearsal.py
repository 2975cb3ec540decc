"""`docker compose up`, rehearsed without Docker: each compose service's own
command and environment, run as a local process, with moto's S3 server on
127.0.0.1 in MinIO's place and a TF Serving stand-in (a gRPC server built
from tensorflow-serving-api's services) in TF Serving's. Ends with a
prediction through the service, as a user's first request would."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import tensorflow as tf
import yaml

from conftest import url_ready, wait_until
from test_containers import compose_config
from test_serve_tfserving import FakeTFServing, start_server

ROOT = Path(__file__).resolve().parents[1]


def service_env(service: dict, s3_endpoint: str) -> dict:
    """The service's compose environment, with MinIO's address swapped for the local endpoint."""
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    if "AWS_ENDPOINT_URL_S3" in env:
        env["AWS_ENDPOINT_URL_S3"] = s3_endpoint
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CIFAR_", "SERVE_"))}, **env}


@pytest.mark.timeout(600)
def test_compose_services_rehearsed_as_local_processes(s3_server, tmp_path):
    services = compose_config()["services"]
    env = {name: service_env(s, s3_server) for name, s in services.items()}
    # Short enough for CI: the compose file reads these from the environment too.
    env["train"].update(CIFAR_TRAIN__EPOCHS="1", CIFAR_DATA__SYNTHETIC__TRAIN_SIZE="2000",
                        CIFAR_DATA__SYNTHETIC__TEST_SIZE="500", CIFAR_DATA__VALIDATION_SIZE="200")

    # buckets: `mc mb --ignore-existing local/cifar`, done the same way through the S3 API.
    creds = {k: env["train"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name=creds["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket="cifar")

    # train: the image's entrypoint is cifar-job.
    train_cmd = [sys.executable, "-m", "job", *services["train"]["command"]]
    done = subprocess.run(train_cmd, cwd=ROOT, env=env["train"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exported model version 1 to s3://cifar/models/cifar10/1" in done.stdout

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
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    fake = FakeTFServing(signature)
    server, port = start_server(fake)

    # serve: its compose environment, TF Serving's address swapped for the stand-in's.
    serve_env = {**env["serve"], "SERVE_TFSERVING_ADDRESS": f"127.0.0.1:{port}", "SERVE_POLL_SECONDS": "0.5"}
    # The container listens on 8080 (the image's SERVE_PORT); here, on a free port.
    assert str(services["serve"]["ports"][0]).endswith("8080") or services["serve"]["ports"][0]["target"] == 8080
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(free), "--host", "127.0.0.1"], cwd=ROOT,
                            env=serve_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{free}"
    try:
        wait_until(lambda: url_ready(url + "/readyz"))
        pixels = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
        answer = requests.post(f"{url}/v1/models/cifar10:predict", json={"instances": pixels.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        expected = signature(images=tf.constant(pixels))["probabilities"].numpy()
        np.testing.assert_allclose([p["probabilities"] for p in answer.json()["predictions"]], expected, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        server.stop(grace=None)

    # A second `docker compose up` finds the run finished instead of training again.
    again = subprocess.run(train_cmd, cwd=ROOT, env=env["train"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert yaml.safe_load(s3.get_object(Bucket="cifar", Key="checkpoints/config.yaml")["Body"].read())[
        "export"]["uri"] == "s3://cifar/models"
