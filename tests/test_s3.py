"""Storage on S3, against a real S3 HTTP endpoint on 127.0.0.1; boto3 is never mocked."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from conftest import SECRET, small_overrides
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
    from job import data
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
    splits = data.load(cfg)
    assert len(splits.x_train) == 90 and len(splits.x_val) == 10 and len(splits.x_test) == 20


def _train(tmp_path, env, *sets):
    cmd = [sys.executable, "-m", "job", "train", *sum((["--set", s] for s in sets), [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env}, cwd=tmp_path)


def test_unreachable_endpoint_exits_4_naming_it_without_the_secret(s3, tmp_path):
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "2"}
    done = _train(tmp_path, env, "checkpoint.uri=s3://my-bucket/ckpt")
    assert done.returncode == 4, done.stderr
    assert "127.0.0.1:9" in done.stderr and "my-bucket" in done.stderr
    assert SECRET not in done.stdout + done.stderr and "Traceback" not in done.stderr


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
