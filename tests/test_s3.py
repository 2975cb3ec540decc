"""Storage on S3, against a real S3 HTTP endpoint on 127.0.0.1; boto3 is never mocked."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from helpers import REAL_SMALL, SECRET, real_small, small_overrides, write_python
from job import storage
from job.errors import StorageError


def test_objects_and_published_directories_round_trip(s3, tmp_path):
    backend = storage.backend(f"s3://{s3}")
    root = f"s3://{s3}/runs"
    assert backend.read_bytes(f"{root}/latest.json") is None
    backend.write_bytes(f"{root}/latest.json", b'{"step": 3}')
    assert json.loads(backend.read_bytes(f"{root}/latest.json")) == {"step": 3}

    staged = backend.staging(root)
    (staged / "sub").mkdir()
    (staged / "a.bin").write_bytes(os.urandom(3000))
    (staged / "sub" / "b.txt").write_text("hello")
    expected = (staged / "a.bin").read_bytes()
    backend.publish(staged, f"{root}/ckpt-3")
    # Objects without the completion marker are what a crashed upload leaves: not published.
    backend.write_bytes(f"{root}/ckpt-4/a.bin", b"partial")
    assert backend.published(root) == ["ckpt-3"]

    copy = backend.local_copy(f"{root}/ckpt-3")
    assert (copy / "a.bin").read_bytes() == expected and (copy / "sub" / "b.txt").read_text() == "hello"
    with pytest.raises(FileExistsError):
        backend.publish(backend.staging(root), f"{root}/ckpt-3")
    backend.delete(f"{root}/ckpt-3")
    assert backend.published(root) == []


@pytest.mark.slow
def test_a_run_on_s3_resumes_and_matches_a_local_run(s3, tmp_path, run_job):
    remote = {"checkpoint.uri": f"s3://{s3}/ckpt", "export.uri": f"s3://{s3}/models"}
    run_job(small_overrides(tmp_path, **remote, **{"train.max_steps": 20}))
    result, log = run_job(small_overrides(tmp_path, **remote))
    assert "resumed from step 20" in log
    local, _ = run_job(small_overrides(tmp_path / "local"))

    backend = storage.backend(result.model_uri)
    record = json.loads(backend.read_bytes(f"s3://{s3}/ckpt/latest.json"))
    assert record["finished"] and record["export"]["uri"] == f"s3://{s3}/models/cifar10/2"
    assert backend.published(f"s3://{s3}/models/cifar10") == ["1", "2"]
    for name in ("metrics.jsonl", "curves.png", "config.yaml"):
        assert backend.read_bytes(f"s3://{s3}/ckpt/{name}")
    probe = np.random.default_rng(1).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    outs = [tf.saved_model.load(str(d)).signatures["serving_default"](images=tf.constant(probe))["probabilities"]
            for d in (backend.local_copy(result.model_uri), local.model_uri)]
    np.testing.assert_array_equal(outs[0].numpy(), outs[1].numpy())


def test_cifar10_archive_read_from_s3(s3, tmp_path):
    from job import sources
    from job.config import load_config

    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([rng.integers(0, 10, (20, 1)), rng.integers(0, 256, (20, 3072))], axis=1)
        (folder / name).write_bytes(records.astype(np.uint8).tobytes())
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    import boto3

    boto3.client("s3").upload_file(str(archive), s3, "datasets/cifar.tar.gz")
    cfg = load_config(None, ["data.source=cifar10", f"data.uri=s3://{s3}/datasets/cifar.tar.gz",
                             "data.validation_size=10", f"data.cache_dir={tmp_path / 'cache'}"])
    splits = sources.load(cfg)
    assert len(splits.x_train) == 90 and len(splits.x_val) == 10 and len(splits.x_test) == 20


def _train(tmp_path, env, *sets):
    cmd = [sys.executable, "-m", "job", "train", *sum((["--set", s] for s in sets), [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env}, cwd=tmp_path)


@pytest.mark.slow
def test_unreachable_endpoint_exits_4_naming_it_without_the_secret(s3, tmp_path):
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "2"}
    done = _train(tmp_path, env, "checkpoint.uri=s3://my-bucket/ckpt")
    assert done.returncode == 4, done.stderr
    assert "127.0.0.1:9" in done.stderr and "my-bucket" in done.stderr
    assert SECRET not in done.stdout + done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_missing_bucket_exits_4_naming_it(s3, tmp_path):
    done = _train(tmp_path, {}, "checkpoint.uri=s3://no-such-bucket-here/ckpt")
    assert done.returncode == 4 and "no-such-bucket-here" in done.stderr and "NoSuchBucket" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_storage_errors_are_storage_errors(s3):
    with pytest.raises(StorageError, match="not a complete published directory"):
        storage.backend(f"s3://{s3}").local_copy(f"s3://{s3}/nothing/here")


def test_working_dir_sync_sends_new_and_changed_files(s3):
    backend = storage.backend(f"s3://{s3}")
    uri = f"s3://{s3}/tb"
    local = backend.working_dir(uri)
    (local / "events.1").write_bytes(b"first")
    backend.sync(uri)
    (local / "events.1").write_bytes(b"first, then more")  # TensorBoard appends to its event file
    (local / "events.2").write_bytes(b"second")
    backend.sync(uri)
    assert backend.read_bytes(f"{uri}/events.1") == b"first, then more"
    assert backend.read_bytes(f"{uri}/events.2") == b"second"


# --- data.uri as an S3 prefix -------------------------------------------------


def _upload_tree(bucket, folder, prefix):
    import boto3

    client = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())


def _data_config(uri, tmp_path, source="cifar10"):
    from job.config import load_config

    return load_config(None, [f"data.source={source}", f"data.uri={uri}", "data.validation_size=50",
                              f"data.cache_dir={tmp_path / 'cache'}"])


def _python_layout(binary_folder, folder):
    """The same images as the real binary files, in the python layout."""
    from job import cifar10

    return write_python(folder, {name: cifar10._parse_binary(binary_folder / f"{name}.bin", name)
                                 for name in cifar10.SPLITS})


@pytest.fixture
def gets(s3):
    """The keys the job's own S3 client GETs (observed through botocore's event hooks, not mocked)."""
    client = storage.backend(f"s3://{s3}").client
    keys = []

    def record(params, **kwargs):
        keys.append(params["Key"])

    client.meta.events.register("before-parameter-build.s3.GetObject", record)
    yield keys
    client.meta.events.unregister("before-parameter-build.s3.GetObject", record)


@pytest.mark.parametrize("layout, slash", [("binary", "/"), ("binary-subfolder", ""), ("python-subfolder", "/")])
def test_a_prefix_reads_like_the_local_directory(s3, tmp_path, layout, slash):
    from job import sources

    binary = real_small(tmp_path / "real")
    local = {"binary": binary, "binary-subfolder": binary.parent,
             "python-subfolder": _python_layout(binary, tmp_path / "py" / "cifar-10-batches-py").parent}[layout]
    _upload_tree(s3, local, "datasets/cifar/")
    uri = f"s3://{s3}/datasets/cifar{slash}"
    remote, here = sources.load(_data_config(uri, tmp_path)), sources.load(_data_config(local, tmp_path))
    assert remote.checksum == here.checksum and remote.class_names == here.class_names == sources.CLASS_NAMES
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(here, name))
    assert len(remote.x_train) + len(remote.x_val) == 300 and len(remote.x_test) == 200


def test_a_prefix_is_cached_by_etag_and_follows_changes(s3, tmp_path, gets):
    import boto3

    from job import cifar10, sources
    from job.errors import DataError

    folder = real_small(tmp_path / "real")
    _upload_tree(s3, folder, "real/")
    cfg = _data_config(f"s3://{s3}/real/", tmp_path)
    first = sources.load(cfg)
    # Only the batch files are fetched, not batches.meta.txt beside them.
    assert sorted(gets) == sorted(f"real/{name}" for name in cifar10.BIN_NAMES)

    gets.clear()
    second = sources.load(cfg)
    assert gets == [] and second.checksum == first.checksum

    raw = (folder / "data_batch_2.bin").read_bytes()
    boto3.client("s3").put_object(Bucket=s3, Key="real/data_batch_2.bin", Body=raw[: 10 * cifar10.RECORD_BYTES])
    third = sources.load(cfg)
    assert gets == ["real/data_batch_2.bin"] and len(third.x_train) + len(third.x_val) == 250

    # An object gone from the prefix is gone from the copy, not read from the cache.
    boto3.client("s3").delete_object(Bucket=s3, Key="real/test_batch.bin")
    with pytest.raises(DataError, match=rf"s3://{s3}/real/: missing CIFAR-10 batch file\(s\) test_batch\.bin"):
        sources.load(cfg)


def test_a_cached_archive_is_not_downloaded_again(s3, tmp_path, gets):
    import boto3

    from job import sources

    boto3.client("s3").upload_file(str(REAL_SMALL), s3, "real.tar.gz")
    cfg = _data_config(f"s3://{s3}/real.tar.gz", tmp_path)
    first = sources.load(cfg)
    assert gets == ["real.tar.gz"]
    assert sources.load(cfg).checksum == first.checksum and gets == ["real.tar.gz"]


def test_a_prefix_without_batch_files_is_a_data_error_naming_it(s3, tmp_path):
    import boto3

    from job import sources
    from job.errors import DataError

    boto3.client("s3").put_object(Bucket=s3, Key="other/readme.txt", Body=b"no batches here")
    for uri in (f"s3://{s3}/other/", f"s3://{s3}/nothing/here"):
        with pytest.raises(DataError, match=f"no CIFAR-10 batch files .* found in {uri}$") as info:
            sources.load(_data_config(uri, tmp_path))
        assert info.value.exit_code == 3


@pytest.mark.parametrize("uri", ["s3://data-bucket/cifar/", "s3://data-bucket/cifar.tar.gz"])
def test_an_unreachable_data_endpoint_is_a_storage_error(s3, tmp_path, monkeypatch, uri):
    from job import sources

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="data-bucket.*127.0.0.1:9") as info:
        sources.load(_data_config(uri, tmp_path))
    assert info.value.exit_code == 4
