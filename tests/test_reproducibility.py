"""A run is a function of its config: its random draws come from `seed` alone,
whatever ran before them in the process, and its checkpoints are resumed only
over the data they were trained on."""

import random
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import tensorflow as tf

from helpers import latest, outputs, small_overrides
from job import sources
from job.config import load_config
from job.errors import ConfigError

pytestmark = pytest.mark.slow  # every test here trains end to end

REAL = Path(__file__).parent / "data" / "cifar10-real-small.tar.gz"
# The fixture holds 300 training images: one epoch of 5 steps.
TINY_REAL = {"data.source": "cifar10", "data.validation_size": 50, "train.batch_size": 50, "train.epochs": 1}


@pytest.mark.parametrize("extra", [{}, {"model.name": "airbench", "model.width": 0.25}], ids=["simple_cnn", "airbench"])
def test_global_random_state_drawn_before_the_build_changes_nothing(tmp_path, run_job, monkeypatch, extra):
    undisturbed, _ = run_job(small_overrides(tmp_path / "undisturbed", **{"train.max_steps": 3, **extra}))
    load = sources.load

    def load_then_draw(*args, **kwargs):
        # What a library may do while the data loads (boto3 does, fetching from S3).
        splits = load(*args, **kwargs)
        random.random()
        np.random.random()
        tf.random.uniform([])
        return splits

    monkeypatch.setattr(sources, "load", load_then_draw)
    disturbed, _ = run_job(small_overrides(tmp_path / "disturbed", **{"train.max_steps": 3, **extra}))
    np.testing.assert_array_equal(outputs(disturbed.model_uri), outputs(undisturbed.model_uri))


def test_a_cold_and_a_warm_data_cache_train_the_same_model(tmp_path, run_job, s3):
    boto3.client("s3").upload_file(str(REAL), s3, "data/cifar10.tar.gz")
    cache = tmp_path / "cache"
    real = {**TINY_REAL, "data.uri": f"s3://{s3}/data/cifar10.tar.gz", "data.cache_dir": str(cache)}
    cold, _ = run_job(small_overrides(tmp_path / "cold", **real))
    cached = sorted(p for p in cache.rglob("*") if p.is_file())
    assert cached, "the first run downloaded nothing into data.cache_dir"
    warm, _ = run_job(small_overrides(tmp_path / "warm", **real))
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == cached
    np.testing.assert_array_equal(outputs(warm.model_uri), outputs(cold.model_uri))


def test_resuming_over_other_data_under_the_same_uri_is_refused(tmp_path, run_job):
    data = tmp_path / "data"
    with tarfile.open(REAL) as tar:
        tar.extractall(data, filter="data")

    def overrides(**extra):
        return small_overrides(tmp_path, **{**TINY_REAL, "data.uri": str(data), **extra})

    run_job(overrides(**{"train.max_steps": 2}))
    recorded = latest(tmp_path)["data_checksum"]
    # Another data set under the same data.uri: one pixel of one training image differs.
    batch = data / "cifar-10-batches-bin" / "data_batch_1.bin"
    raw = bytearray(batch.read_bytes())
    raw[1] ^= 0xFF
    batch.write_bytes(bytes(raw))
    replaced = sources.load(load_config(None, overrides())).checksum
    assert replaced != recorded

    # A finished run is done before any data is read.
    _, log = run_job(overrides(**{"train.max_steps": 2}))
    assert "nothing to do" in log
    with pytest.raises(ConfigError, match=r"^data: ") as info:
        run_job(overrides(**{"train.max_steps": 4}))
    assert recorded in str(info.value) and replaced in str(info.value)
    assert latest(tmp_path)["step"] == 2
