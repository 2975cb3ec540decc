"""`docker compose up`, for real: both images built from the Dockerfiles as
users get them (`make images`), and docker-compose.yml as shipped run on a
real Docker engine, with tests/compose/docker-compose.test.yml standing in
only for what cannot be had here (MinIO, the CIFAR-10 download, TF Serving;
that file says how). The steps run in order on one compose project, as a
user's session would: up, a killed run resumed, a SIGTERM, a second version
under load, a thousand slow clients, a drain, and two training containers as
one cluster.

Traffic stays on this machine: between the project's own containers, and to
the S3 and service ports they publish on 127.0.0.1.
"""

import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
import tomllib
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import tensorflow as tf
import yaml
from PIL import Image

from helpers import AGREEMENT_RUN, SlowClients, assert_agree, compose_missing, free_port, timed_status, wait_until

# The first test also builds the images: minutes on a cold Docker cache.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
FILES = ["docker-compose.yml", "tests/compose/docker-compose.test.yml"]
MULTIWORKER = "docker-compose.multiworker.yml"
LONG_RUNNING = ("minio", "model-sync", "tfserving", "serve")
IMAGE = ROOT / "serve" / "static" / "samples" / "automobile.png"  # a real photograph, not a CIFAR-10 image
PIXELS = np.asarray(Image.open(IMAGE).convert("RGB").resize((32, 32)), dtype=np.uint8)  # IMAGE as v1 and v2 take it


def engine_missing() -> str | None:
    if missing := compose_missing():
        return missing
    if not shutil.which("debootstrap"):
        return "needs Debian's debootstrap package (debootstrap is not on PATH)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode:
        return "needs a running Docker engine (dockerd, from Debian's docker.io package)"
    return None


class Compose:
    """`docker compose` (v2) on one project, with the files and variables a test gives."""

    def __init__(self, project: str, env: dict, files: list[str] = FILES):
        self.project, self.env, self.files = project, env, files

    def with_files(self, *extra: str) -> "Compose":
        return Compose(self.project, self.env, [*self.files, *extra])

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 600) -> str:
        # Only the variables compose interpolates are the test's; none of the caller's CIFAR_/SERVE_/AWS_ leak in.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CIFAR_", "SERVE_", "AWS_", "MINIO_"))}
        files = [arg for f in self.files for arg in ("-f", f)]
        done = subprocess.run(["docker", "compose", "-p", self.project, *files, *args], cwd=ROOT,
                              env={**base, **self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"docker compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done.stdout

    def container(self, service: str) -> str:
        # -a: v2's ps lists only running containers, and the tests inspect and wait on ones that exit.
        return self("ps", "-a", "-q", service).strip()

    def state(self, service: str) -> dict:
        out = subprocess.run(["docker", "inspect", self.container(service)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]["State"]

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", service)

    def wait(self, service: str, timeout: float = 600) -> int:
        """The exit code of the service's container, once it has exited."""
        out = subprocess.run(["docker", "wait", self.container(service)], capture_output=True, text=True,
                             timeout=timeout, check=True)
        return int(out.stdout.strip())


@pytest.fixture(scope="module")
def images():
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    done = subprocess.run(["bash", "scripts/images.sh"], cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def stack(images):
    ports = {"S3_HOST_PORT": str(free_port()), "SERVE_HOST_PORT": str(free_port())}
    compose = Compose(f"cifar10-test-{uuid.uuid4().hex[:8]}", ports)
    compose("build", "minio")
    try:
        yield compose
    finally:
        compose.with_files(MULTIWORKER)("down", "--volumes", "--remove-orphans", "--timeout", "5")


@pytest.fixture(scope="module")
def s3(stack):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{stack.env['S3_HOST_PORT']}",
                        aws_access_key_id="minioadmin", aws_secret_access_key="minioadmin", region_name="us-east-1")


@pytest.fixture(scope="module")
def service(stack):
    return f"http://127.0.0.1:{stack.env['SERVE_HOST_PORT']}"


def latest_step(s3, checkpoints: str) -> int | None:
    try:
        return json.loads(s3.get_object(Bucket="cifar", Key=f"{checkpoints}/latest.json")["Body"].read())["step"]
    except s3.exceptions.NoSuchKey:
        return None


def download(s3, prefix: str, into: Path) -> Path:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="cifar", Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            target = into / obj["Key"][len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("cifar", obj["Key"], str(target))
    return into


def probe_outputs(s3, version_prefix: str) -> dict[str, np.ndarray]:
    body = s3.get_object(Bucket="cifar", Key=f"{version_prefix}/assets.extra/probe_outputs.npz")["Body"].read()
    with np.load(io.BytesIO(body)) as npz:
        return dict(npz)


def start_training_until_first_checkpoint(stack, s3, env: dict) -> int:
    stack("up", "-d", "--no-deps", "train", env=env)
    checkpoints = env["CIFAR_CHECKPOINT__URI"].removeprefix("s3://cifar/")
    return wait_until(lambda: latest_step(s3, checkpoints), timeout=300, interval=0.2, what="the first checkpoint")


class Load:
    """Clients sending v1 :predict requests back to back, each answer recorded as
    (sent, answered, HTTP status or the exception's name, X-Model-Version)."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.answers, self.stopping = url, [], threading.Event()
        body = {"instances": [PIXELS.tolist()]}
        self.threads = [threading.Thread(target=self._send, args=(body,)) for _ in range(clients)]

    def _send(self, body):
        with requests.Session() as session:
            while not self.stopping.is_set():
                sent = time.monotonic()
                try:
                    answer = session.post(f"{self.url}/v1/models/cifar10:predict", json=body, timeout=30)
                    self.answers.append((sent, time.monotonic(), answer.status_code,
                                         answer.headers.get("X-Model-Version")))
                except requests.RequestException as exc:
                    self.answers.append((sent, time.monotonic(), type(exc).__name__, None))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join()


# -- a. up ---------------------------------------------------------------------


def test_up_trains_on_s3_exports_and_serves_through_tf_serving(stack, s3, service, tmp_path):
    stack("up", "-d")
    assert stack.wait("train") == 0, stack.logs("train")[-3000:]
    assert "exported model version 1 to s3://cifar/models/cifar10/1" in stack.logs("train")
    # The data set went into S3 through the dataset service, and the job read it from there.
    assert s3.head_object(Bucket="cifar", Key="data/cifar-10-binary.tar.gz")["ContentLength"] > 0
    assert "data: 250 train, 50 validation, 200 test examples (cifar10" in stack.logs("train")
    assert latest_step(s3, "checkpoints") == 24 * 5
    assert stack.state("dataset")["ExitCode"] == 0 and stack.state("buckets")["ExitCode"] == 0

    # model-sync mirrors the version, TF Serving's stand-in loads it, and the service is ready on it.
    ready = wait_until(lambda: (r := requests.get(f"{service}/readyz", timeout=2)).status_code == 200 and r,
                       timeout=180, what="the service to be ready")
    assert ready.json()["version"] == 1
    assert "synced version 1 of s3://cifar/models/cifar10" in stack.logs("model-sync")
    assert "serving cifar10 version 1" in stack.logs("tfserving")

    # Every answer crosses the compose network to TF Serving's stand-in and is the exported model's own.
    model = tf.saved_model.load(str(download(s3, "models/cifar10/1", tmp_path / "1"))).signatures["serving_default"]
    expected = model(images=tf.constant(PIXELS[None]))["probabilities"].numpy()[0]

    with IMAGE.open("rb") as f:
        answer = requests.post(f"{service}/predict", files={"file": f}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == 1 and len(answer.json()["predictions"]) == 5

    answer = requests.post(f"{service}/v1/models/cifar10:predict", json={"instances": [PIXELS.tolist()]}, timeout=30)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["predictions"][0]["probabilities"], expected, rtol=1e-5, atol=1e-6)

    answer = requests.post(f"{service}/v2/models/cifar10/infer", timeout=30, json={"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": PIXELS.reshape(-1).tolist()}]})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    np.testing.assert_allclose(outputs["probabilities"]["data"], expected, rtol=1e-5, atol=1e-6)

    # Docker's own verdict on every long-running service.
    def healthy():
        return all(stack.state(name)["Health"]["Status"] == "healthy" for name in LONG_RUNNING)

    wait_until(healthy, timeout=180, interval=1, what=f"{', '.join(LONG_RUNNING)} to be healthy")

    # Lineage: both images carry the OCI labels `make images` set, and version 1's card names the
    # commit and the image it was trained in, and where its data came from.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for image in ("train", "serve"):
        labels = json.loads(subprocess.run(
            ["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", f"cifar10-pipeline-{image}:dev"],
            capture_output=True, text=True, check=True).stdout)
        assert labels["org.opencontainers.image.revision"] == head, labels
        assert labels["org.opencontainers.image.version"] == version, labels
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"]), labels
        assert labels["org.opencontainers.image.source"], labels
    card = json.loads(s3.get_object(Bucket="cifar", Key="models/cifar10/1/assets.extra/model_card.json")["Body"].read())
    assert card["lineage"]["code_revision"] == head and card["lineage"]["image"] == "cifar10-pipeline-train:dev"
    assert card["lineage"]["data"]["uri"] == "s3://cifar/data/cifar-10-binary.tar.gz", card["lineage"]


# -- b. kill and resume ----------------------------------------------------------


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_runs_weights(stack, s3):
    env = {"CIFAR_CHECKPOINT__URI": "s3://cifar/killed/checkpoints", "CIFAR_EXPORT__URI": "s3://cifar/killed/models"}
    first = start_training_until_first_checkpoint(stack, s3, env)
    subprocess.run(["docker", "kill", stack.container("train")], check=True, capture_output=True)
    assert stack.wait("train") == 137
    step = latest_step(s3, "killed/checkpoints")
    assert step >= first and step < 24 * 5, "killed mid-run"

    stack("up", "-d", "--no-deps", "train", env=env)
    assert stack.wait("train") == 0, stack.logs("train")[-3000:]
    assert f"resumed from step {step}" in stack.logs("train")
    # The same weights as step a's uninterrupted run: its export answered its probe batch alike, to the bit.
    resumed, uninterrupted = probe_outputs(s3, "killed/models/cifar10/1"), probe_outputs(s3, "models/cifar10/1")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


# -- c. SIGTERM ------------------------------------------------------------------

SECOND_RUN = {"CIFAR_CHECKPOINT__URI": "s3://cifar/second/checkpoints"}  # exports beside the first: version 2


def test_docker_stop_commits_a_checkpoint_and_exits_75(stack, s3):
    start_training_until_first_checkpoint(stack, s3, SECOND_RUN)
    subprocess.run(["docker", "stop", "--time", "45", stack.container("train")], check=True, capture_output=True)
    assert stack.wait("train") == 75, stack.logs("train")[-3000:]
    step = latest_step(s3, "second/checkpoints")
    assert f"SIGTERM: committed checkpoint at step {step}; exiting to be retried" in stack.logs("train")
    assert step < 24 * 5


# -- d. a new version under load -------------------------------------------------


def test_a_second_version_takes_over_under_load_without_a_failed_request(stack, s3, service):
    stopped_at = latest_step(s3, "second/checkpoints")
    with Load(service) as load:
        stack("up", "-d", "--no-deps", "train", env=SECOND_RUN)
        assert stack.wait("train") == 0, stack.logs("train")[-3000:]
        assert f"resumed from step {stopped_at}" in stack.logs("train")
        wait_until(lambda: any(a[3] == "2" for a in load.answers), timeout=180, what="an answer from version 2")
        time.sleep(2)
    assert len(load.answers) > 50
    assert [a for a in load.answers if a[2] != 200] == []
    first_v2 = min(answered for _, answered, _, version in load.answers if version == "2")
    assert {version for sent, _, _, version in load.answers if sent > first_v2} == {"2"}


def test_a_thousand_slow_clients_delay_no_normal_client_of_the_serving_container(stack, service):
    port = int(stack.env["SERVE_HOST_PORT"])
    headers, bodies = SlowClients(port, 500, body=False), SlowClients(port, 500, body=True)
    try:
        latencies = []
        for _ in range(6):
            headers.trickle()
            bodies.trickle()
            latencies.append(timed_status(lambda: requests.get(f"{service}/healthz", timeout=10)))
            latencies.append(timed_status(lambda: requests.post(f"{service}/v1/models/cifar10:predict", timeout=10,
                                                                json={"instances": [PIXELS.tolist()]})))
            time.sleep(0.5)
        assert all(status == 200 for _, status in latencies), latencies
        assert max(seconds for seconds, _ in latencies) < 1.0, latencies
        # The image's defaults: headers within 10 s, no pause over 10 s in a body.
        wait_until(lambda: headers.closed() == 500 and bodies.closed() == 500, timeout=30, interval=1,
                   what="nginx to close the slow connections")
    finally:
        headers.close()
        bodies.close()


# -- e. drain --------------------------------------------------------------------


def test_stopping_the_service_fails_no_request_sent_while_it_was_ready(stack, service):
    readiness = []  # (sent, status)
    polling = threading.Event()

    def poll():
        while not polling.is_set():
            sent = time.monotonic()
            try:
                readiness.append((sent, requests.get(f"{service}/readyz", timeout=2).status_code))
            except requests.RequestException:
                readiness.append((sent, None))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    with Load(service) as load:
        poller.start()
        time.sleep(1)
        stack("stop", "serve")
    polling.set()
    poller.join()
    assert 503 in [status for _, status in readiness], "readiness went to 503 while the service drained"
    last_ready = max(sent for sent, status in readiness if status == 200)
    before = [a for a in load.answers if a[0] <= last_ready]
    assert len(before) > 10
    assert [a for a in before if a[2] != 200] == []
    assert stack.state("serve")["ExitCode"] == 0


# -- f. scale-out ----------------------------------------------------------------


def agreement_run(tmp_path: Path, name: str, services: list[str]) -> str:
    """An override running the distribute tests' agreement recipe (synthetic data) in the given
    services, written where compose reads it; returns its path."""
    values = {**AGREEMENT_RUN, "data.source": "synthetic", "checkpoint.uri": f"s3://cifar/{name}/checkpoints",
              "export.uri": f"s3://cifar/{name}/models"}
    command = ["train", *sum((["--set", f"{k}={v}"] for k, v in values.items()), [])]
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({"services": {s: {"command": command} for s in services}}))
    return str(path)


def probabilities(s3, version_prefix: str, into: Path) -> np.ndarray:
    from job import sources

    _, (x_test, _) = sources.synthetic(1, AGREEMENT_RUN["data.synthetic.test_size"])
    model = tf.saved_model.load(str(download(s3, version_prefix, into))).signatures["serving_default"]
    return model(images=tf.constant(x_test))["probabilities"].numpy()


def test_two_training_containers_train_as_one_cluster(stack, s3, tmp_path):
    one = stack.with_files(agreement_run(tmp_path, "one", ["train"]))
    one("up", "-d", "--no-deps", "train")
    assert one.wait("train") == 0, one.logs("train")[-3000:]

    two = stack.with_files(MULTIWORKER, agreement_run(tmp_path, "two", ["train", "train-1"]))
    two("up", "-d", "--no-deps", "train", "train-1")
    assert two.wait("train") == 0, two.logs("train")[-3000:]
    assert two.wait("train-1") == 0, two.logs("train-1")[-3000:]
    assert ("strategy: MultiWorkerMirroredStrategy, 2 workers, 2 replicas (this is worker 0, chief)"
            in two.logs("train"))
    assert "(this is worker 1, not the chief: writes nothing)" in two.logs("train-1")
    assert_agree(probabilities(s3, "two/models/cifar10/1", tmp_path / "two"),
                 probabilities(s3, "one/models/cifar10/1", tmp_path / "one"))
