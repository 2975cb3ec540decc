"""Lineage (issue 30): each version's model card says where it came from (the
commit, the image, the platform's job ids, the data and its checksum, when),
and both images carry the OCI labels that say the same of them.

Fast but for the one training run; the image checks read the Dockerfiles and
scripts/images.sh, and never run Docker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO, SECRET, small_overrides
from job import lineage
from job.config import load_config

pytestmark = pytest.mark.usefixtures("no_cifar_env")

PRESIGNED = ("https://bucket.s3.amazonaws.com/cifar.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             f"&X-Amz-Credential=AKIA{SECRET}&X-Amz-Signature={SECRET}")
OCI_LABELS = ("revision", "source", "created", "version")
JOBS = [
    ({"AWS_BATCH_JOB_ID": "0f1e-42", "AWS_BATCH_JOB_ATTEMPT": "2"},
     {"platform": "aws-batch", "id": "0f1e-42", "attempt": 2}),
    ({"TRAINING_JOB_NAME": "cifar-7", "TRAINING_JOB_ARN": "arn:aws:sagemaker:eu-west-1:1:training-job/cifar-7"},
     {"platform": "sagemaker", "name": "cifar-7", "id": "arn:aws:sagemaker:eu-west-1:1:training-job/cifar-7"}),
    ({"CLOUD_ML_JOB_ID": "1234567"}, {"platform": "vertex", "id": "1234567"}),
    ({"CIFAR_K8S_JOB_NAME": "cifar10-train", "CIFAR_K8S_POD_NAME": "cifar10-train-x7k2p",
      "CIFAR_K8S_NAMESPACE": "ml"},
     {"platform": "kubernetes", "name": "cifar10-train", "pod": "cifar10-train-x7k2p", "namespace": "ml"}),
    # Set but empty, or an attempt that is no number: nothing is made up.
    ({"AWS_BATCH_JOB_ID": "j", "AWS_BATCH_JOB_ATTEMPT": "two"}, {"platform": "aws-batch", "id": "j", "attempt": None}),
    ({"AWS_BATCH_JOB_ID": "", "CIFAR_K8S_POD_NAME": ""}, {"platform": None}),
]


@pytest.mark.parametrize("environ, expected", JOBS)
def test_the_platforms_job_ids(environ, expected):
    got = lineage.job(environ).model_dump()
    assert {k: got[k] for k in expected} == expected
    assert all(v is None for k, v in got.items() if k not in expected)


def git(cwd: Path, *args: str) -> str:
    if not shutil.which("git"):
        pytest.skip("needs Debian's git package")
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout with one commit, its code at the top as this repository's job/ is."""
    git(tmp_path, "init", "-q")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "x.py").write_text("x = 1\n")
    git(tmp_path, "add", "job")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return tmp_path


def test_the_revision_and_dirtiness_of_the_checkout(checkout):
    head = git(checkout, "rev-parse", "HEAD")
    assert lineage.git_revision(checkout) == (head, False)
    (checkout / "job" / "x.py").write_text("x = 2\n")
    assert lineage.git_revision(checkout) == (head, True)
    # Code installed inside another repository (a venv in it) is not that repository's commit.
    assert lineage.git_revision(checkout / "job") == (None, None)


def test_the_image_revision_where_there_is_no_checkout(tmp_path):
    cfg = load_config(None, ["data.source=synthetic"])
    env = {"CIFAR_CODE_REVISION": "c0ffee", "CIFAR_IMAGE": "registry.example/train:7"}
    got = lineage.collect(cfg, "sha256:ab", "2.21.0", env, checkout=tmp_path)
    assert (got.code_revision, got.code_dirty, got.image) == ("c0ffee", None, "registry.example/train:7")
    bare = lineage.collect(cfg, "sha256:ab", "2.21.0", {}, checkout=tmp_path)
    assert (bare.code_revision, bare.image, bare.job.platform) == (None, None, None)


def test_the_checkout_comes_before_the_baked_revision(checkout):
    cfg = load_config(None, ["data.source=synthetic"])
    got = lineage.collect(cfg, "sha256:ab", "2.21.0", {"CIFAR_CODE_REVISION": "stale"}, checkout=checkout)
    assert got.code_revision == git(checkout, "rev-parse", "HEAD")


def test_locations_are_recorded_without_their_secrets(tmp_path):
    cfg = load_config(None, ["data.source=cifar10", f"data.uri={PRESIGNED}", "checkpoint.uri=s3://runs/ckpt"])
    got = lineage.collect(cfg, "sha256:ab", "2.21.0", {}, checkout=tmp_path)
    assert SECRET not in got.model_dump_json()
    assert got.data.uri.startswith("https://bucket.s3.amazonaws.com/cifar.tar.gz?")
    assert got.data.uri.endswith("X-Amz-Signature=***") and got.data.source == "cifar10"
    assert got.checkpoint_uri == "s3://runs/ckpt"
    # No data.uri for cifar10 is the canonical archive, which is named.
    canonical = lineage.collect(load_config(None, ["data.source=cifar10"]), "sha256:ab", "2.21.0", {},
                                checkout=tmp_path)
    assert canonical.data.uri.startswith("https://www.cs.toronto.edu/")


def flat(value, prefix=""):
    """Every leaf of the card's lineage, as MLflow tags would name them."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from flat(inner, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


@pytest.mark.slow
def test_an_exported_version_says_where_it_came_from(tmp_path, run_job, monkeypatch):
    for name, value in {"AWS_BATCH_JOB_ID": "8a1b-batch", "AWS_BATCH_JOB_ATTEMPT": "3", "CIFAR_CODE_REVISION": "baked",
                        "CIFAR_IMAGE": "registry.example/cifar10-pipeline-train:abc"}.items():
        monkeypatch.setenv(name, value)
    run_job(small_overrides(tmp_path))
    card = json.loads((tmp_path / "export/cifar10/1/assets.extra/model_card.json").read_text())
    got = card["lineage"]
    assert got["image"] == "registry.example/cifar10-pipeline-train:abc"
    assert got["job"] == {"platform": "aws-batch", "id": "8a1b-batch", "attempt": 3, "name": None, "pod": None,
                          "namespace": None}
    assert got["data"] == {"source": "synthetic", "uri": None, "checksum": card["data_checksum"]}
    assert got["data"]["checksum"] == json.loads((tmp_path / "ckpt" / "latest.json").read_text())["data_checksum"]
    assert got["checkpoint_uri"] == str(tmp_path / "ckpt")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got["created"])
    assert got["package_version"] and got["tensorflow_version"] == card["tensorflow"] and got["python_version"]
    # From this checkout where the tests run from one, else the revision the environment gives.
    head, _ = lineage.git_revision(lineage.CHECKOUT)
    assert got["code_revision"] == (head or "baked")
    # Plain JSON values, nested one level at most: what MLflow's tags take.
    assert all(isinstance(v, (str, int, float, bool, type(None))) for _, v in flat(got))
    assert max(key.count(".") for key, _ in flat(got)) <= 1


# --- the images' OCI labels ----------------------------------------------------------------


def dockerfile(name: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The last stage's ARGs, LABELs and ENVs of a Dockerfile, instructions joined across line ends."""
    text = re.sub(r"\\\n\s*", " ", (REPO / name).read_text())
    last = text.rsplit("\nFROM ", 1)[-1]
    lines = [line.strip() for line in last.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)(?:=(\S*))?", "\n".join(lines), re.M))
    labels = dict(re.findall(r'(\S+)="(\$\{?\w+\}?)"', " ".join(line for line in lines if line.startswith("LABEL"))))
    env = [line for line in lines if line.startswith("ENV")]
    return args, labels, env


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.serve"])
def test_both_images_declare_the_oci_labels_from_build_args(name):
    args, labels, env = dockerfile(name)
    for label in OCI_LABELS:
        value = labels.get(f"org.opencontainers.image.{label}")
        assert value is not None, f"{name}: no LABEL org.opencontainers.image.{label}"
        arg = value.strip("${}")
        assert arg in args, f"{name}: the label {label} is set from ${arg}, which no ARG of the last stage declares"
    # The revision reaches the job's model card through the environment.
    assert any("CIFAR_CODE_REVISION=" in line for line in env), name


def test_make_images_passes_every_label_argument():
    script = (REPO / "scripts" / "images.sh").read_text()
    build_args = set(re.findall(r"--build-arg\s+(\w+)=", script))
    for name in ("Dockerfile.train", "Dockerfile.serve"):
        args, labels, _ = dockerfile(name)
        assert {labels[f"org.opencontainers.image.{label}"].strip("${}") for label in OCI_LABELS} <= build_args
    assert "git rev-parse HEAD" in script and "date -u +%Y-%m-%dT%H:%M:%SZ" in script


# --- the service shows the served version's card ------------------------------------------------------

CARD = {"test_accuracy": 0.5, "data_checksum": "sha256:ab",
        "lineage": {"code_revision": "c0ffee", "code_dirty": False, "image": "registry.example/train:7",
                    "job": {"platform": "aws-batch", "id": "8a1b", "attempt": 1, "name": None, "pod": None,
                            "namespace": None},
                    "data": {"source": "cifar10", "uri": PRESIGNED, "checksum": "sha256:ab"},
                    "checkpoint_uri": "s3://runs/ckpt", "created": "2025-01-02T03:04:05Z", "package_version": "0.1.0",
                    "tensorflow_version": "2.21.0", "python_version": "3.11.2"}}


def write_card(card: dict | None):
    """A damage for publish_copy: the version's model card replaced (None: removed)."""
    def damage(version_dir: Path) -> None:
        path = version_dir / "assets.extra" / "model_card.json"
        path.unlink()
        if card is not None:
            path.write_text(json.dumps(card))
    return damage


@pytest.mark.slow
def test_the_service_shows_the_served_versions_card(make_app, exported_model, tmp_path):
    from helpers import publish_copy, wait_until
    from serve.settings import Settings

    base = tmp_path / "cifar10"
    publish_copy(base, exported_model, write_card(CARD))
    c = make_app(Settings(model_uri=str(base), poll_seconds=0.1, api_keys=["k1"])).test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200, what="the app to be ready")
    key = {"X-API-Key": "k1"}
    for route in ("/v1/models/cifar10/card", "/v1/models/cifar10/versions/1/card"):
        answer = c.get(route, headers=key)
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1", answer.json
        assert answer.json["lineage"]["image"] == "registry.example/train:7"
        assert answer.json["lineage"]["job"]["id"] == "8a1b"
        # Written by hand with a presigned URL in it: the service shows it redacted all the same.
        assert SECRET not in answer.get_data(as_text=True)
        assert answer.json["lineage"]["data"]["uri"].endswith("X-Amz-Signature=***")
    assert c.get("/v1/models/cifar10/card").status_code == 401  # guarded as the metadata is
    for route in ("/v1/models/cifar10/versions/2/card", "/v1/models/other/card", "/v1/models/cifar10/labels/x/card"):
        assert c.get(route, headers=key).status_code == 404, route
    # In the OpenAPI document, under the key, with the card's schema.
    document = c.get("/openapi.json").json
    operation = document["paths"]["/v1/models/{name}/card"]["get"]
    assert operation["security"] and set(operation["responses"]) >= {"200", "401", "404"}
    assert "lineage" in document["components"]["schemas"]["ModelCard"]["properties"]
    assert "Lineage" in document["components"]["schemas"]


def test_a_version_without_a_card_answers_404_saying_so(make_app, exported_model, tmp_path):
    from helpers import publish_copy, wait_until
    from serve.settings import Settings

    base = tmp_path / "cifar10"
    publish_copy(base, exported_model, write_card(None))
    c = make_app(Settings(model_uri=str(base), poll_seconds=0.1)).test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200, what="the app to be ready")
    answer = c.get("/v1/models/cifar10/card")
    assert answer.status_code == 404 and answer.json == {"error": "version 1 has no model card"}


def publish_on_s3(bucket: str, prefix: str, card: bytes, tmp_path: Path) -> None:
    """A version under `prefix` as the job publishes it (files, then the manifest), a card its one file of note."""
    import boto3

    from common import layout

    folder = tmp_path / "version"
    (folder / "assets.extra").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / layout.CARD).write_bytes(card)
    client = boto3.client("s3")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key=f"{prefix}/{layout.MARKER}", Body=layout.manifest(folder))


def test_the_card_is_read_from_s3_as_its_manifest_recorded_it(s3, tmp_path):
    import boto3

    from common import layout
    from serve import store

    publish_on_s3(s3, "models/cifar10/3", json.dumps(CARD).encode(), tmp_path)
    assert store.card(f"s3://{s3}/models/cifar10", 3) == CARD
    boto3.client("s3").put_object(Bucket=s3, Key=f"models/cifar10/3/{layout.CARD}", Body=b"{}")
    with pytest.raises(store.VersionError, match="corrupt"):
        store.card(f"s3://{s3}/models/cifar10", 3)


def test_the_tfserving_backend_needs_the_model_store_for_cards():
    from serve.settings import Settings
    from serve.tfserving import TFServing

    backend = TFServing(Settings(backend="tfserving", tfserving_address="127.0.0.1:9", poll_seconds=60))
    try:
        with pytest.raises(LookupError, match="set SERVE_MODEL_URI"):
            backend.card(1)
    finally:
        backend.close()
