"""The service's S3 downloads: exactly the files a version's `_COMPLETE`
manifest lists, each checked against its SHA-256; a damaged version is
refused by name while the previous one keeps serving. Against moto's real S3
server, never a mocked boto3."""

import re

import boto3
import pytest

from helpers import WEIGHTS, pixels, republish, wait_until
from job import export, model
from serve import store
from serve.settings import Settings

PIXELS = pixels(2, seed=5)


@pytest.fixture
def source(s3):
    """One exported version at `src/cifar10/1`, to be published under other names."""
    export.export(model.build("simple_cnn"), f"s3://{s3}/src", "cifar10", {}, PIXELS)
    return s3, "src/cifar10/1"


def refresh_failures(client) -> float:
    found = re.search(r"^cifar_serve_model_refresh_failures_total (\S+)$", client.get("/metrics").text, re.M)
    return float(found.group(1))


@pytest.mark.slow
def test_a_damaged_version_is_refused_by_name_and_the_previous_one_keeps_serving(source, tmp_path, caplog, make_app):
    bucket, src = source
    republish(bucket, src, "models/cifar10/1")
    cache = tmp_path / "cache"
    app = make_app(Settings(model_uri=f"s3://{bucket}/models/cifar10", poll_seconds=0.2, cache_dir=str(cache)))
    backend = app.extensions["predictor"].backend
    c = app.test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200)
    failures = refresh_failures(c)

    republish(bucket, src, "models/cifar10/2", damage={WEIGHTS: b"other bytes"})
    damaged = f"s3://{bucket}/models/cifar10/2/{WEIGHTS}"
    wait_until(lambda: 2 in backend.problems)
    assert backend.problems[2] == "version 2 refused: its files cannot be served"  # as /readyz would say it
    told = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and damaged in r.getMessage()]
    assert len(told) == 1 and "corrupt" in told[0] and "SHA-256" in told[0], told
    assert refresh_failures(c) > failures
    assert c.get("/readyz").json["version"] == 1
    answer = c.post("/v1/models/cifar10:predict", json={"instances": PIXELS.tolist()})
    assert answer.status_code == 200 and len(answer.json["predictions"]) == 2
    # Nothing of version 2 is left where a later load would find and trust it.
    assert [p.name.rsplit("-", 1)[1] for p in cache.iterdir()] == ["1"]

    republish(bucket, src, "models/cifar10/3")
    wait_until(lambda: c.get("/readyz").json.get("version") == 3)
    assert c.post("/v1/models/cifar10:predict", json={"instances": PIXELS.tolist()}).status_code == 200
    assert set(backend.problems) == {2}  # still refused, and nothing else wrong


def test_a_file_the_manifest_lists_must_be_there_and_nothing_else_is_fetched(source, tmp_path):
    bucket, src = source
    base = f"s3://{bucket}/models/cifar10"
    republish(bucket, src, "models/cifar10/1", damage={"variables/variables.index": None})
    with pytest.raises(store.VersionError, match=re.escape(f"{base}/1/variables/variables.index is listed")):
        store.local_path(base, 1, str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []

    republish(bucket, src, "models/cifar10/2")
    boto3.client("s3").put_object(Bucket=bucket, Key="models/cifar10/2/stray.bin", Body=b"not published")
    copy = store.local_path(base, 2, str(tmp_path / "cache"))
    assert (copy / WEIGHTS).is_file() and not (copy / "stray.bin").exists()


def test_a_manifest_cannot_write_outside_the_download(s3, tmp_path):
    client = boto3.client("s3")
    client.put_object(Bucket=s3, Key="m/cifar10/1/x", Body=b"x")
    client.put_object(Bucket=s3, Key="m/cifar10/1/_COMPLETE", Body=b'{"../../escaped": "00"}')
    with pytest.raises(store.VersionError, match="not a file inside the directory"):
        store.local_path(f"s3://{s3}/m/cifar10", 1, str(tmp_path / "a" / "cache"))
    assert not (tmp_path / "a" / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_the_client_times_out_and_retries_in_standard_mode(s3):
    # A stalled endpoint must not hang the watcher or the sync sidecar for good.
    from common import s3 as common_s3

    config = common_s3.client().meta.config
    assert (config.connect_timeout, config.read_timeout, config.retries["mode"]) == (5, 30, "standard")
