"""Which tf.distribute strategy a run uses, read from where it runs.

- `TF_CONFIG` naming several workers (Kubeflow's TFJob and Vertex AI set it;
  on AWS Batch multi-node jobs it is derived here): MultiWorkerMirroredStrategy.
- Several local GPUs, or `distribute.cpu_devices` > 1: MirroredStrategy.
- Otherwise TensorFlow's default strategy: one device and no overhead.

`distribute.strategy` names one of these to insist on it; `auto` (the
default) picks from the environment. Whatever the strategy, `train.batch_size`
is the global batch, so the same config trains the same model on any of them.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import tensorflow as tf

from job.config import Distribute
from job.errors import ConfigError, PeerLost


@dataclass(frozen=True)
class Cluster:
    name: str
    strategy: tf.distribute.Strategy
    workers: int
    worker_index: int

    @property
    def is_chief(self) -> bool:
        # MultiWorkerMirroredStrategy's chief is worker 0 (TF_CONFIG without a "chief" task).
        return self.worker_index == 0

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def describe(self) -> str:
        role = "chief" if self.is_chief else "not the chief: writes nothing"
        return (f"strategy: {self.name}, {self.workers} worker{'s' * (self.workers > 1)}, "
                f"{self.replicas} replica{'s' * (self.replicas > 1)} (this is worker {self.worker_index}, {role})")

    def any_worker(self, flag: bool) -> bool:
        """Whether the flag is up on any worker. Every worker must ask at the
        same point: it is a collective. It lets one worker's SIGTERM stop
        them all at the same step, with a checkpoint the chief commits."""
        if self.workers == 1:
            return flag
        return bool(self._count_raised(tf.constant(float(flag))) > 0)

    @functools.cached_property
    def _count_raised(self):
        strategy = self.strategy
        return tf.function(lambda flag: strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: flag),
                                                        axis=None))

    def check_global_batch(self, global_batch: int) -> None:
        if global_batch % self.replicas:
            raise ConfigError(f"train.batch_size: {global_batch} does not split evenly across "
                              f"{self.replicas} replicas; use a multiple of {self.replicas}")


_TF_CONFIG_SHAPE = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'


def resolve(cfg: Distribute, environ: Mapping[str, str] = os.environ) -> Cluster:
    """Builds the strategy. Must run before any other TensorFlow op: logical
    devices and collective ops can only be set up while the runtime is fresh."""
    tf_config = _tf_config(environ) or aws_batch_tf_config(environ, cfg.port, cfg.startup_timeout_seconds)
    workers = len(tf_config["cluster"]["worker"]) if tf_config else 1
    choice = cfg.strategy
    if choice == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        choice = "multi_worker" if workers > 1 else "mirrored" if len(gpus) > 1 or cfg.cpu_devices > 1 else "one_device"
    if choice == "multi_worker" and workers < 2:
        raise ConfigError("distribute.strategy is 'multi_worker' but neither TF_CONFIG nor AWS Batch's "
                          "multi-node variables name more than one worker")
    if choice != "multi_worker" and workers > 1:
        raise ConfigError(f"distribute.strategy is '{choice}' but TF_CONFIG names {workers} workers; "
                          f"use 'auto' or 'multi_worker'")
    _split_cpu(cfg.cpu_devices)
    if choice == "one_device":
        return Cluster("one device", tf.distribute.get_strategy(), 1, 0)
    if choice == "mirrored":
        return Cluster("MirroredStrategy", tf.distribute.MirroredStrategy(_local_devices()), 1, 0)
    return _multi_worker(tf_config, cfg.startup_timeout_seconds)


def _tf_config(environ: Mapping[str, str]) -> dict | None:
    raw = environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config.get("task", {})
        extra = sorted(set(cluster) - {"worker", "chief"})
        if extra:
            raise ConfigError(f"TF_CONFIG: cluster has {', '.join(extra)} tasks; this job trains with "
                              f"MultiWorkerMirroredStrategy, which takes only 'chief' and 'worker'")
        # A TFJob with a Chief replica lists it apart; MultiWorkerMirroredStrategy
        # treats it as one more worker, and the chief as worker 0.
        hosts = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
        index = int(task["index"]) + (len(cluster.get("chief", [])) if task["type"] == "worker" else 0)
        if not 0 <= index < len(hosts) or task["type"] not in ("worker", "chief"):
            raise ConfigError(f"TF_CONFIG: task {task} is not one of the cluster's {len(hosts)} workers")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not valid: {exc!r}; expected {_TF_CONFIG_SHAPE}") from exc
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def aws_batch_tf_config(environ: Mapping[str, str], port: int, timeout: float) -> dict | None:
    """TF_CONFIG for an AWS Batch multi-node parallel job, or None outside one.

    AWS Batch tells each child node only the main node's address, and the main
    node nobody's. So the nodes meet once: children report to the main node on
    `port`, which answers everyone with the full list, ordered by node index.
    Node i's TensorFlow server then listens on `port + 1 + i`: distinct ports
    cost nothing across machines and let a whole cluster rehearse on one.
    """
    nodes = int(environ.get("AWS_BATCH_JOB_NUM_NODES", "1"))
    if nodes < 2:
        return None
    index = int(environ["AWS_BATCH_JOB_NODE_INDEX"])
    if index == int(environ.get("AWS_BATCH_JOB_MAIN_NODE_INDEX", "0")):
        hosts = _gather(nodes, index, port, timeout)
    else:
        hosts = _report(environ["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"], index, port, timeout)
    workers = [f"{host}:{port + 1 + i}" for i, host in enumerate(hosts)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def _gather(nodes: int, own_index: int, port: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    hosts: dict[int, str] = {}
    waiting: list[socket.socket] = []
    with socket.create_server(("", port)) as server:
        while len(waiting) < nodes - 1:
            server.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn, (peer, _) = server.accept()
            except TimeoutError:
                raise PeerLost(f"AWS Batch multi-node: {len(waiting) + 1} of {nodes} nodes reported to the main node "
                               f"within distribute.startup_timeout_seconds ({timeout:g}s)") from None
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            report = json.loads(conn.makefile().readline())
            hosts[int(report["index"])] = peer
            hosts[own_index] = report["main"]
            waiting.append(conn)
        ordered = [hosts[i] for i in range(nodes)]
        for conn in waiting:
            with conn:
                conn.sendall((json.dumps(ordered) + "\n").encode())
    return ordered


def _report(main: str, index: int, port: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((main, port), timeout=5) as conn:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                conn.sendall((json.dumps({"index": index, "main": main}) + "\n").encode())
                return json.loads(conn.makefile().readline())
        except (OSError, ValueError) as exc:
            # The main node may not be listening yet.
            if time.monotonic() > deadline:
                raise PeerLost(f"AWS Batch multi-node: node {index} could not reach the main node at {main}:{port} "
                               f"within distribute.startup_timeout_seconds ({timeout:g}s): {exc}") from exc
            time.sleep(1)


def _split_cpu(devices: int) -> None:
    if devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)


def _local_devices() -> list[str]:
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def _multi_worker(tf_config: dict, timeout: float) -> Cluster:
    workers, index = tf_config["cluster"]["worker"], tf_config["task"]["index"]
    _wait_for_peers(workers, index, timeout)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(tf_config["cluster"]), task_type="worker", task_id=index, rpc_layer="grpc")
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    return Cluster("MultiWorkerMirroredStrategy", strategy, len(workers), index)


def _wait_for_peers(workers: list[str], index: int, timeout: float) -> None:
    """Returns once every other worker is up, or fails the job.

    The strategy itself waits for the cluster inside TensorFlow, holding the
    GIL, for up to an hour, deaf to Python and to SIGTERM. So each worker
    first listens on its own TF_CONFIG port until it has reached all the
    others there (or their TensorFlow servers, which take the port over).
    """
    deadline = time.monotonic() + timeout
    pending = [w for i, w in enumerate(workers) if i != index]
    with socket.create_server(("", int(workers[index].rsplit(":", 1)[1]))):
        while pending:
            host, port = pending[0].rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    raise PeerLost(f"worker {workers.index(pending[0])} ({pending[0]}) of TF_CONFIG did not start "
                                   f"within distribute.startup_timeout_seconds ({timeout:g}s)") from None
                time.sleep(0.2)
