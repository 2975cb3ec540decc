"""What object storage does to a batch job in real life: kill -9, outages,
a second run on the same prefix, damaged objects. Each runs the real CLI
against a real S3 HTTP endpoint on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
import tensorflow as tf

from helpers import SECRET, small_overrides, wait_until
from job import storage

pytestmark = pytest.mark.slow  # every test here trains end to end against the S3 endpoint

# Long enough (several seconds) to be interrupted on purpose.
LONG = {"data.synthetic.train_size": 4200, "train.epochs": 4, "checkpoint.every_steps": 10,
        "checkpoint.lease_seconds": 3}


def job(tmp_path, bucket, **extra):
    remote = {"checkpoint.uri": f"s3://{bucket}/ckpt", "export.uri": f"s3://{bucket}/models"}
    sets = small_overrides(tmp_path, **{**LONG, **remote, **extra})
    return [sys.executable, "-m", "job", "train", *sum((["--set", s] for s in sets), [])]


def committed(bucket) -> dict | None:
    try:
        return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="ckpt/latest.json")["Body"].read())
    except boto3.client("s3").exceptions.NoSuchKey:
        return None


def exported_outputs(model_uri: str) -> np.ndarray:
    local = storage.backend(model_uri).local_copy(model_uri) if model_uri.startswith("s3://") else model_uri
    probe = np.random.default_rng(5).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    return tf.saved_model.load(str(local)).signatures["serving_default"](images=tf.constant(probe))[
        "probabilities"].numpy()


def test_kill_9_then_restart_resumes_and_ends_bit_identical(s3, tmp_path, run_job):
    cmd = job(tmp_path, s3)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (committed(s3) or {}).get("step", 0) >= 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = committed(s3)["step"]

    restarted = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr
    assert f"resumed from step {step}" in restarted.stdout
    uninterrupted, _ = run_job(small_overrides(tmp_path / "local", **LONG))
    final = committed(s3)
    assert final["finished"] and final["step"] == uninterrupted.step
    np.testing.assert_array_equal(exported_outputs(final["export"]["uri"]), exported_outputs(uninterrupted.model_uri))


def test_an_outage_mid_run_delays_commits_but_the_run_completes(s3, tmp_path):
    from moto.server import ThreadedMotoServer

    # A server of this test's own on a port of its own, so it can go away and come back.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}
    proc = subprocess.Popen(job(tmp_path, s3), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: committed(s3))
        server.stop()
        time.sleep(5)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, err
    final = committed(s3)
    assert final["finished"] and final["step"] == 4 * (4000 // 32)
    assert storage.backend(f"s3://{s3}").published(f"s3://{s3}/ckpt")


def test_a_second_run_on_the_same_prefix_is_refused_while_the_first_lives(s3, tmp_path):
    first = subprocess.Popen(job(tmp_path, s3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: committed(s3))
        second = subprocess.run(job(tmp_path, s3), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert "another run" in second.stderr and "checkpoint.uri" in second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert committed(s3)["finished"]


def test_a_damaged_checkpoint_object_is_named_not_loaded(s3, tmp_path):
    cmd = job(tmp_path, s3, **{"train.max_steps": 10})
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    client = boto3.client("s3")
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=s3, Prefix="ckpt/ckpt-10/")["Contents"]
               if ".data-" in o["Key"])
    client.put_object(Bucket=s3, Key=key, Body=b"not a checkpoint")
    resumed = subprocess.run(job(tmp_path, s3, **{"train.max_steps": 20}), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 4
    assert key.rsplit("/", 1)[1] in resumed.stderr and "corrupt" in resumed.stderr
    assert SECRET not in resumed.stdout + resumed.stderr


@pytest.mark.parametrize("grace", [30.0])
def test_sigterm_on_s3_commits_within_the_grace_budget(s3, tmp_path, grace):
    proc = subprocess.Popen(job(tmp_path, s3, **{"checkpoint.grace_seconds": grace}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: committed(s3))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert time.monotonic() - sent < grace
    step = int(err.split("checkpoint at step ")[1].split(";")[0])
    assert committed(s3)["step"] == step
