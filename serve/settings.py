"""The service's settings: `SERVE_*` environment variables, overridden by
`cifar-serve` flags. One pydantic model, printed at start."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common import redact
from serve import store

# Where SageMaker unpacks an endpoint's model.tar.gz; a job trained on
# SageMaker exported into the same path (SM_MODEL_DIR), so the archive holds
# `<model_name>/<version>/`. An archive packed by hand may hold bare `<version>/`.
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")

# Measured (docs/benchmarks.md, Serving memory and Hostile clients): a worker's
# RSS idles at about 616 MiB, but some 373 MiB of it is TensorFlow's libraries,
# mapped once for all workers (and charged once to a container). A worker holds
# about 242 MiB of its own when idle, and 8 near-limit images at once added at
# most its decoding budget (serve/budget.py, 128 MiB): about 370 MiB. The master
# and one copy of the libraries are about 410 MiB. Counting 512 MiB for the
# service and 512 MiB per worker holds that worst case, with some 140 MiB a
# worker left for request bodies.
WORKER_MEMORY = 512 * 2**20
# cgroup v2, then v1: the container's memory limit, which the kernel enforces by killing.
CGROUP_MEMORY_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
MEMINFO = Path("/proc/meminfo")

# Routes that run the model, which SERVE_API_KEYS guard; health, metrics and docs stay open.
PROTECTED_PREFIXES = ("/v1/", "/v2/models/", "/predict", "/invocations")
# Readiness is open wherever it is asked, like /readyz, though v2 asks it under /v2/models/.
OPEN_ENDPOINTS = frozenset({"v2.v2_model_ready"})


def protected(path: str, endpoint: str | None) -> bool:
    """Whether a request for `path` (routed to `endpoint`; None when no route matched) needs a key."""
    return path.startswith(PROTECTED_PREFIXES) and endpoint not in OPEN_ENDPOINTS


def _split(value):
    """`key1,key2` (a list in the environment's only type) or a list: the non-blank items, stripped."""
    items = value.split(",") if isinstance(value, str) else value
    return [v.strip() for v in items if v.strip()] if isinstance(items, list) else items


def memory_for_workers() -> int | None:
    """Bytes the service may use: the lower of the cgroup's memory limit and
    MemAvailable (which a container reads from its host); None if neither is known."""
    known = []
    for path in CGROUP_MEMORY_LIMITS:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:  # v2 writes "max" for no limit, v1 a number near 2**63
            known.append(int(value))
    try:
        known.append(int(re.search(r"^MemAvailable:\s+(\d+) kB", MEMINFO.read_text(), re.M).group(1)) * 1024)
    except (OSError, AttributeError):
        pass
    return min(known) if known else None


def default_workers() -> int:
    """One per core, at most 4, and no more than the memory holds (at least one)."""
    cores = min(len(os.sched_getaffinity(0)), 4)
    memory = memory_for_workers()
    return cores if memory is None else max(1, min(cores, memory // WORKER_MEMORY - 1))


def _sagemaker_model_uri() -> str | None:
    """The model base inside SageMaker's model directory, when there is one."""
    root = SAGEMAKER_MODEL_DIR
    if not root.is_dir():
        return None
    named = [p for p in sorted(root.iterdir()) if store.versions(str(p))]
    if len(named) == 1 and not store.versions(str(root)):
        return str(named[0])
    # Bare versions, or nothing servable yet: the service starts and /ping says 503 until there is.
    return str(root)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVE_", extra="forbid", frozen=True)

    # <export.uri>/<model_name>, local or s3://: the highest complete version is served.
    # Unset: SageMaker's model directory, when the service runs there.
    model_uri: str | None = Field(default_factory=_sagemaker_model_uri)
    model_name: str | None = None  # defaults to the last part of model_uri
    backend: Literal["inprocess", "tfserving"] = "inprocess"
    tfserving_address: str = "localhost:8500"
    tfserving_timeout_s: float = Field(10.0, gt=0)

    host: str = "0.0.0.0"
    # nginx in front (serve/front.py) reads each request whole, so a slow client holds no
    # worker thread. auto: nginx where it is installed (the serving image has it), else
    # gunicorn alone, which the startup line says.
    front: Literal["auto", "nginx", "none"] = "auto"
    # A connection whose headers take longer than this in all is closed (nginx).
    header_timeout_s: float = Field(10.0, gt=0)
    # A connection whose body pauses longer than this between two reads is closed (nginx).
    body_timeout_s: float = Field(10.0, gt=0)
    port: int = Field(8080, ge=1, le=65535)
    # One process runs one request's Python (JSON, validation) at a time, and
    # that, not the batched model, is what bounds throughput; so one worker
    # per core, each with its own copy of the model and its own batcher. At
    # most 4 by default, and fewer where memory is short: each worker also
    # holds a TensorFlow runtime (default_workers).
    workers: int = Field(default_factory=default_workers, ge=1)
    threads: int = Field(16, ge=1)
    # TensorFlow's intra-op and inter-op thread pools in each worker of the
    # in-process backend (the TF Serving backend holds no TensorFlow), both this
    # size; unset, TensorFlow sizes each to every core the worker sees, in every
    # worker, CPU quota or not. Set in the worker before TensorFlow starts its
    # runtime. On 2 cores, 1 changed neither memory nor throughput (docs/benchmarks.md).
    tf_threads: int | None = Field(None, ge=1)

    poll_seconds: float = Field(5.0, gt=0)
    max_batch_size: int = Field(32, ge=1)
    batch_timeout_ms: float = Field(2.0, ge=0)
    max_queue: int = Field(256, ge=1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_instances: int = Field(256, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    api_keys: Annotated[list[str], NoDecode] = []
    cors_origins: Annotated[list[str], NoDecode] = []
    cache_dir: str = "/tmp/cifar-serve-models"
    # Rollouts. Both are read at start: changing them means a restart.
    # Serve exactly this version (not newer ones); until it exists the service is not ready.
    model_version: int | None = Field(None, ge=0)
    # A version whose model card's test_accuracy is lower (or missing) is refused, here and by the sync.
    min_accuracy: float | None = Field(None, ge=0, le=1)
    # Keep the version served before the current one loaded (twice the memory), so that
    # withdrawing the current one from the model base rolls back without a load.
    keep_previous: bool = False
    # Shutdown, for a load balancer: on SIGTERM /readyz answers 503 at once while
    # the service keeps answering (and closing kept-alive connections) for
    # drain_seconds, so the balancer stops sending; then requests in flight
    # get graceful_timeout to finish before the workers are killed.
    drain_seconds: float = Field(5.0, ge=0)
    graceful_timeout: float = Field(30.0, gt=0)
    # The folder through which the workers agree on the version they answer
    # with (serve/rollout.py). gunicorn's master sets it for its workers;
    # unset, a process keeps a private one.
    state_dir: str | None = None
    # TensorFlow's own start-up lines (CUDA probes, oneDNN notices) in the log.
    debug: bool = False
    # json: every log line (ours, gunicorn's, access lines) one JSON object, for
    # log pipelines that index fields instead of parsing text.
    log_format: Literal["text", "json"] = "text"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return _split(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value):
        # Empty is unset, auth off: compose passes `${SERVE_API_KEYS:-}` when no keys are given. Set
        # to nothing but commas and blanks is a mistake (a variable meant to hold keys and empty of
        # them), which would turn auth off without a word: refused.
        keys = _split(value)
        if value and not keys:
            raise ValueError("holds no key, only commas or blanks; leave it empty or unset for none (auth off)")
        return keys

    def public(self) -> dict:
        """What the startup line prints: every setting, URIs redacted, and whether auth is on
        instead of the keys."""
        auth = f"{len(self.api_keys)} API key{'s' if len(self.api_keys) != 1 else ''}" if self.api_keys else "off"
        return redact.redact_data({**self.model_dump(mode="json", exclude={"api_keys"}), "auth": auth})

    @property
    def stuck_after_s(self) -> int:
        """When a request is taken to be stuck, past its own deadline's 504: gunicorn then kills the
        worker, and nginx gives up waiting for it."""
        return int(self.request_timeout_s) + 30

    @property
    def name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model_uri:
            return self.model_uri.rstrip("/").rsplit("/", 1)[-1]
        return "cifar10"
