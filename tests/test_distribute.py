"""Scale-out with tf.distribute: the strategy read from the environment, the
global batch split so every replica sees its slice of what one device would,
only the chief writing, and real multi-process runs on 127.0.0.1 compared
with one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from job import data, distribute, sources
from job.config import Distribute
from job.errors import ConfigError, PeerLost

from helpers import AGREEMENT_RUN, assert_agree, free_port, wait_until


def free_ports_in_a_row(n: int) -> int:
    """The first of n consecutive free ports (AWS Batch nodes use distribute.port + 1 + index)."""
    while True:
        first = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                for s, port in zip((a, b), range(first + 1, first + n), strict=False):
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def job_command(root: Path, **extra) -> list[str]:
    values = {**AGREEMENT_RUN, "checkpoint.uri": root / "ckpt", "export.uri": root / "export", **extra}
    return [sys.executable, "-m", "job", "train", *sum((["--set", f"{k}={v}"] for k, v in values.items()), [])]


def tf_config_env(ports: list[int], index: int) -> dict:
    workers = [f"127.0.0.1:{p}" for p in ports]
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}


def aws_batch_env(index: int) -> dict:
    env = {"AWS_BATCH_JOB_NUM_NODES": "2", "AWS_BATCH_JOB_NODE_INDEX": str(index), "AWS_BATCH_JOB_MAIN_NODE_INDEX": "0"}
    if index:
        env["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] = "127.0.0.1"
    return env


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs, strict=True)]


def run_workers(root: Path, envs: list[dict], **extra) -> list[tuple[int, str, str]]:
    return finish([start(job_command(root, **extra), env) for env in envs])


def probabilities(root: Path) -> np.ndarray:
    versions = sorted((root / "export" / "cifar10").iterdir())
    assert [v.name for v in versions] == ["1"], "exactly one version is exported"
    _, (x_test, _) = sources.synthetic(1, AGREEMENT_RUN["data.synthetic.test_size"])
    serve = tf.saved_model.load(str(versions[0])).signatures["serving_default"]
    return serve(images=tf.constant(x_test))["probabilities"].numpy()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    [(rc, out, err)] = run_workers(root, [{}])
    assert rc == 0, err
    assert "strategy: one device, 1 worker, 1 replica" in out
    return root


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    ports = [free_port(), free_port()]
    results = run_workers(root, [tf_config_env(ports, 0), tf_config_env(ports, 1)])
    for rc, _, err in results:
        assert rc == 0, err
    return root, results


# -- the strategy from the environment ---------------------------------------


def test_tf_config_with_chief_counts_the_chief_as_worker_0():
    env = {"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
                                    "task": {"type": "worker", "index": 1}})}
    assert distribute._tf_config(env) == {"cluster": {"worker": ["a:1", "b:2", "c:3"]},
                                          "task": {"type": "worker", "index": 2}}


@pytest.mark.parametrize("tf_config, message", [
    ("not json", "TF_CONFIG is not valid"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG is not valid"),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}),
     "cluster has ps tasks"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}),
     "not one of the cluster's 2 workers"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "evaluator", "index": 0}}),
     "not one of the cluster's 2 workers"),
])
def test_bad_tf_config_is_a_config_error(tf_config, message):
    with pytest.raises(ConfigError, match=message):
        distribute.resolve(Distribute(), {"TF_CONFIG": tf_config})


def test_an_explicit_strategy_must_fit_the_environment():
    two = tf_config_env([1, 2], 0)
    with pytest.raises(ConfigError, match="'one_device' but TF_CONFIG names 2 workers"):
        distribute.resolve(Distribute(strategy="one_device"), two)
    with pytest.raises(ConfigError, match="'multi_worker' but neither TF_CONFIG nor AWS Batch"):
        distribute.resolve(Distribute(strategy="multi_worker"), {})


def test_global_batch_must_split_evenly_across_replicas():
    three = distribute.Cluster("MirroredStrategy", type("S", (), {"num_replicas_in_sync": 3})(), 1, 0)
    with pytest.raises(ConfigError, match="train.batch_size: 64 does not split evenly across 3 replicas"):
        three.check_global_batch(64)
    three.check_global_batch(96)


@pytest.mark.slow
def test_aws_batch_nodes_meet_at_the_main_node_and_agree_on_the_cluster():
    port = free_port()
    results: dict[int, dict] = {}

    def node(index):
        results[index] = distribute.aws_batch_tf_config(
            {"AWS_BATCH_JOB_NUM_NODES": "3", "AWS_BATCH_JOB_NODE_INDEX": str(index),
             "AWS_BATCH_JOB_MAIN_NODE_INDEX": "1", "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": "127.0.0.1"},
            port, timeout=30)

    # Children first: they retry until the main node listens.
    threads = [threading.Thread(target=node, args=(i,)) for i in (2, 0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=60)
    workers = [f"127.0.0.1:{port + 1 + i}" for i in range(3)]
    assert results == {i: {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}} for i in range(3)}
    assert distribute.aws_batch_tf_config({"AWS_BATCH_JOB_NUM_NODES": "1"}, port, 1) is None


@pytest.mark.slow
def test_aws_batch_nodes_that_never_meet_fail_with_a_clear_error():
    port = free_port()
    main = {"AWS_BATCH_JOB_NUM_NODES": "2", "AWS_BATCH_JOB_NODE_INDEX": "0"}
    with pytest.raises(PeerLost, match="1 of 2 nodes reported to the main node within"):
        distribute.aws_batch_tf_config(main, port, timeout=1)
    child = {**main, "AWS_BATCH_JOB_NODE_INDEX": "1", "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": "127.0.0.1"}
    with pytest.raises(PeerLost, match=f"node 1 could not reach the main node at 127.0.0.1:{port}"):
        distribute.aws_batch_tf_config(child, port, timeout=1)


# -- the data each replica sees ----------------------------------------------


@pytest.mark.parametrize("workers, replicas", [(1, 2), (2, 2), (2, 4)])
def test_replicas_together_see_exactly_the_global_batch(workers, replicas):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(100, dtype=np.int32)
    stream = data.TrainStream(images, labels, seed=5, batch_size=16, augment=True)
    one_device = list(stream.epoch(epoch=2, start_step=1).as_numpy_iterator())
    per_worker = [list(stream.epoch(2, 1, tf.distribute.InputContext(workers, w, replicas)).as_numpy_iterator())
                  for w in range(workers)]
    local = replicas // workers
    assert len(one_device) == 5 and all(len(batches) == 5 * local for batches in per_worker)
    for step, (want_images, want_labels) in enumerate(one_device):
        # Replica r of the cluster is local replica r % local of worker r // local.
        slices = [per_worker[r // local][step * local + r % local] for r in range(replicas)]
        np.testing.assert_array_equal(np.concatenate([s[0] for s in slices]), want_images)
        np.testing.assert_array_equal(np.concatenate([s[1] for s in slices]), want_labels)


# -- real runs ---------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_train_one_model_that_agrees_with_one_process(one_process, two_workers):
    root, [(_, chief_out, _), (_, worker_out, _)] = two_workers
    assert "strategy: MultiWorkerMirroredStrategy, 2 workers, 2 replicas (this is worker 0, chief)" in chief_out
    assert "(this is worker 1, not the chief: writes nothing)" in worker_out
    assert "trained to step 60; the chief evaluates and exports" in worker_out
    assert "exported model version 1" in chief_out and "exported" not in worker_out
    card = json.loads((root / "export/cifar10/1/assets.extra/model_card.json").read_text())
    assert card["distribution"] == {"strategy": "MultiWorkerMirroredStrategy", "workers": 2, "replicas": 2}
    epochs = [json.loads(line)["epoch"] for line in (root / "ckpt/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    assert_agree(probabilities(root), probabilities(one_process))


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_agrees_with_one_device(one_process, tmp_path):
    [(rc, out, err)] = run_workers(tmp_path, [{}], **{"distribute.cpu_devices": 2})
    assert rc == 0, err
    assert "strategy: MirroredStrategy, 1 worker, 2 replicas" in out
    assert_agree(probabilities(tmp_path), probabilities(one_process))


@pytest.mark.slow
def test_killed_workers_resume_and_end_exactly_where_an_uninterrupted_run_ends(two_workers, tmp_path):
    """On AWS Batch's multi-node variables rather than TF_CONFIG, to run that path end to end too."""
    port = free_ports_in_a_row(3)
    cmd = job_command(tmp_path, **{"distribute.port": port})
    procs = [start(cmd, aws_batch_env(i)) for i in (0, 1)]
    latest = tmp_path / "ckpt" / "latest.json"
    wait_until(lambda: latest.exists() and json.loads(latest.read_text())["step"] >= 10, timeout=240)
    for p in procs:
        p.kill()
    finish(procs)
    killed_at = json.loads(latest.read_text())["step"]
    assert killed_at < 60, "the run was killed before it finished"

    results = run_workers(tmp_path, [aws_batch_env(0), aws_batch_env(1)], **{"distribute.port": port})
    for rc, out, err in results:
        assert rc == 0, err
        assert f"resumed from step {killed_at}" in out
    np.testing.assert_array_equal(probabilities(tmp_path), probabilities(two_workers[0]))


@pytest.mark.slow
def test_a_dead_worker_fails_the_job_fast_with_a_retryable_exit(tmp_path):
    ports = [free_port(), free_port()]
    cmd = job_command(tmp_path, **{"train.epochs": 50})
    chief, worker = start(cmd, tf_config_env(ports, 0)), start(cmd, tf_config_env(ports, 1))
    wait_until(lambda: (tmp_path / "ckpt" / "latest.json").exists(), timeout=240)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    _, err = chief.communicate(timeout=120)
    assert chief.returncode == 75
    assert ("worker 1 of the cluster stopped answering (UnavailableError); exiting so the job is retried and "
            "every worker resumes from the last committed checkpoint") in err


@pytest.mark.slow
def test_a_worker_that_never_starts_fails_the_job(tmp_path):
    ports = [free_port(), free_port()]
    [(rc, _, err)] = run_workers(tmp_path, [tf_config_env(ports, 0)], **{"distribute.startup_timeout_seconds": 3})
    assert rc == 75
    assert (f"worker 1 (127.0.0.1:{ports[1]}) of TF_CONFIG did not start within "
            "distribute.startup_timeout_seconds (3s)") in err


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_all_at_one_step_that_the_chief_commits(tmp_path):
    ports = [free_port(), free_port()]
    cmd = job_command(tmp_path, **{"train.epochs": 50})
    chief, worker = start(cmd, tf_config_env(ports, 0)), start(cmd, tf_config_env(ports, 1))
    latest = tmp_path / "ckpt" / "latest.json"
    wait_until(lambda: latest.exists(), timeout=240)
    worker.send_signal(signal.SIGTERM)
    (rc0, _, err0), (rc1, _, err1) = finish([chief, worker], timeout=120)
    step = json.loads(latest.read_text())["step"]
    assert (rc0, rc1) == (75, 75), err0[-2000:] + err1[-2000:]
    assert f"SIGTERM: committed checkpoint at step {step}; exiting to be retried" in err0
    assert f"SIGTERM: stopping at step {step}, where the chief commits a checkpoint" in err1


OVERFLOW_ON_ONE_REPLICA = """
import keras
import numpy as np
import tensorflow as tf

from job import distribute
from job.config import Distribute
from job.trainer import Trainer
cluster = distribute.resolve(Distribute(cpu_devices=2))
with cluster.strategy.scope():
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((1,))
    net = keras.Model(inputs, keras.layers.Dense(10, dtype="float32")(keras.layers.Dense(4)(inputs)))
    keras.config.set_dtype_policy("float32")
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    trainer = Trainer(net, opt, global_batch_size=4)
before = [w.copy() for w in net.get_weights()]
scale = float(opt.dynamic_scale.numpy())
# Replica 0 gets ordinary inputs, replica 1 inputs beyond float16's range (65504): whatever the
# random weights, its gradients are not finite. (At 60000 they overflowed only mostly: when the
# saturated softmax happened to pick the label, the gradients were zero.)
x = np.array([[1.0], [1.0], [1e5], [1e5]], np.float32)
ds = tf.data.Dataset.from_tensors((x, np.zeros(4, np.int32)))
it = iter(cluster.strategy.experimental_distribute_dataset(ds))
trainer.train_loop(it, tf.constant(1))
after = net.get_weights()
assert all((a == b).all() for a, b in zip(before, after, strict=True)), "the step must be skipped on every replica"
assert float(opt.dynamic_scale.numpy()) == scale / 2
print("skipped everywhere")
"""


@pytest.mark.slow
def test_a_float16_overflow_on_one_replica_skips_the_step_on_all():
    """Keras' LossScaleOptimizer looks at one replica's gradients only; left alone, the other
    replica's inf reaches the weights. (A script: logical devices need a fresh TensorFlow.)"""
    done = subprocess.run([sys.executable, "-c", OVERFLOW_ON_ONE_REPLICA], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "skipped everywhere" in done.stdout, done.stderr[-3000:]
