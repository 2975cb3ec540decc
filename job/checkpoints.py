"""Checkpoints that a crash can never leave half-written, committed in the
background so training goes on while they upload.

A checkpoint is written to a local staging directory (fast, and a consistent
snapshot), then, on a background thread: published as `ckpt-<step>/` in one
step, named by `latest.json`, and only then are older checkpoints deleted.
Whatever a killed run leaves behind is either complete and named, or ignored
and cleaned up when the next run starts. An outage delays commits, which retry for
`checkpoint.retry_seconds`; training does not wait for them.

When one is due, and what goes into it besides the run's variables, is the
Checkpointer's business.

TensorFlow's CheckpointManager is not used: its state file and deletion
assume one local filesystem and write the index before the data is safe in
remote storage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import tensorflow as tf

from job import model, storage
from job.config import Config
from job.errors import ConfigError, StorageError
from job.parts import Chunk, Parts

RECORD = "record.json"


class Uploader:
    """One background thread that runs storage writes in order, each retried
    through outages until `retry_seconds` have passed."""

    def __init__(self, retry_seconds: float):
        self.retry_seconds = retry_seconds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uploader")
        self._futures: list[Future] = []
        self.gave_up = False  # a write failed for good: what was queued after it stands on nothing

    def submit(self, fn, *args, undo=None) -> None:
        """Run fn(*args) after everything submitted before; `undo` runs if it gives up."""
        self.raise_failed()
        self._futures.append(self._pool.submit(self._with_retries, fn, args, undo))

    def _with_retries(self, fn, args, undo):
        try:
            return storage.retry(fn, *args, seconds=self.retry_seconds)
        except BaseException:
            self.gave_up = True
            if undo is not None:
                undo()
            raise

    def raise_failed(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()  # re-raises the StorageError of a commit that gave up

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every write so far; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in list(self._futures):
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                future.result(timeout=remaining)
            except TimeoutError:
                return False
        self.raise_failed()
        return True


class CheckpointStore:
    """A run's `checkpoint.uri`: its checkpoints and latest.json, and the
    other files of the run beside them, written in order on one uploader."""

    def __init__(self, uri: str, keep: int, uploader: Uploader, key: str = "checkpoint.uri"):
        self.uri = uri
        self.keep = keep
        self.key = key  # the config key that names `uri`, which its errors lead with
        self._storage: storage.Storage = storage.backend(uri, key)
        self._uploader = uploader

    def at(self, uri: str, key: str) -> CheckpointStore:
        """Another run's checkpoints (checkpoint.resume_from, model.init_from), on this store's uploader."""
        return CheckpointStore(uri, self.keep, self._uploader, key)

    def read(self, name: str) -> bytes | None:
        return self._storage.read_bytes(storage.join(self.uri, name))

    def write(self, name: str, data: bytes) -> None:
        """Write a file of the run now, whole."""
        self._storage.write_bytes(storage.join(self.uri, name), data)

    def write_later(self, name: str, data: bytes) -> None:
        """Write a file of the run after every commit queued before it: storage
        never shows a record that no committed checkpoint covers."""
        self._uploader.submit(self.write, name, data)

    def after_commits(self, fn) -> None:
        """Call fn() once every commit queued before it has landed, and not at all if one gave up: for
        records that must never show an epoch no committed checkpoint covers. fn must not raise."""
        self._uploader.submit(lambda: None if self._uploader.gave_up else fn())

    def working_dir(self, name: str) -> Path:
        return self._storage.working_dir(storage.join(self.uri, name))

    def writing(self, path: str | Path) -> contextlib.AbstractContextManager:
        """Local files of the run written within (TensorFlow's too): a failure
        is a StorageError led by this store's key, naming the file and cause."""
        return storage.writing(path, self.key)

    def sync_later(self, name: str) -> None:
        """Send `working_dir(name)` after every commit queued before it."""
        self._uploader.submit(self._storage.sync, storage.join(self.uri, name))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every queued write; False if `timeout` passed first."""
        return self._uploader.flush(timeout)

    def published(self) -> list[str]:
        return self._storage.published(self.uri)

    def clean_staging(self) -> None:
        """Drop what a killed run staged but never committed: at a run's start,
        before anything is staged, since a staging directory in use looks the same."""
        self._storage.clean_staging(self.uri)

    @property
    def latest_uri(self) -> str:
        return storage.join(self.uri, "latest.json")

    def latest(self) -> dict | None:
        raw = self._storage.read_bytes(self.latest_uri)
        return json.loads(raw) if raw else None

    def save(self, checkpoint: tf.train.Checkpoint, step: int, previous: dict | None, **fields) -> dict:
        """Snapshot `step` now and commit it in the background; return the latest.json it will write."""
        staged = self._storage.staging(self.uri)
        kept = [s for s in (previous or {}).get("kept", []) if s != step] + [step]
        record = {**(previous or {}), **fields, "step": step, "checkpoint": f"ckpt-{step}",
                  "kept": kept[-self.keep:]}
        try:
            with self.writing(staged):
                checkpoint.write(str(staged / "ckpt"))
                # The record travels inside the checkpoint too: a restart from this
                # step (checkpoint.resume_from) needs the run as it was then.
                (staged / RECORD).write_text(json.dumps(record, indent=2))
        except StorageError:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        self._uploader.submit(self._commit, staged, record, undo=lambda: shutil.rmtree(staged, ignore_errors=True))
        return record

    def _commit(self, staged, record: dict) -> None:
        target = storage.join(self.uri, record["checkpoint"])
        if staged.exists():  # a retry after the publish itself succeeded has nothing left to move
            self._storage.publish(staged, target, replace=True)
        self._write_latest({**record, "committed_at": time.time()})
        self._prune(record)

    def update(self, previous: dict, **fields) -> dict:
        record = {**previous, **fields}
        self._uploader.submit(self._write_latest, record)
        return record

    def _write_latest(self, record: dict) -> None:
        self._storage.write_bytes(self.latest_uri, json.dumps(record, indent=2).encode())

    def record_at(self, step: int) -> dict | None:
        """latest.json as it was when `step` was committed, or None where there is no such checkpoint."""
        raw = self._storage.read_bytes(storage.join(self.uri, f"ckpt-{step}", RECORD))
        return json.loads(raw) if raw else None

    def restore(self, checkpoint: tf.train.Checkpoint, step: int) -> None:
        local = self._storage.local_copy(storage.join(self.uri, f"ckpt-{step}"))
        checkpoint.read(str(local / "ckpt")).assert_existing_objects_matched().expect_partial()

    def _prune(self, record: dict) -> None:
        # Only after the newer checkpoint is committed, and never the best one.
        wanted = {f"ckpt-{s}" for s in record["kept"]}
        if record.get("best"):
            wanted.add(f"ckpt-{record['best']['step']}")
        for name in self._storage.published(self.uri):
            if name.startswith("ckpt-") and name not in wanted:
                self._storage.delete(storage.join(self.uri, name))


class Checkpointer:
    """When a checkpoint is due, and committing one: every worker keeps the
    run's training time in its progress, the chief writes the checkpoint."""

    def __init__(self, cfg: Config, store: CheckpointStore, parts: Parts, latest: dict | None, data_checksum: str,
                 is_chief: bool = True, lease: Lease | None = None, annotate: Callable[[], dict] | None = None):
        self.cfg, self.store, self.parts, self.is_chief, self.lease = cfg, store, parts, is_chief, lease
        # Fields of the record that others keep up to date (the MLflow run's id, job/tracking.py).
        self.annotate = annotate or dict
        self.record = {**(latest or {}), "fingerprint": cfg.fingerprint(), "data_checksum": data_checksum,
                       "network_revision": model.REVISIONS[cfg.model.name]}
        self._started, self._before = time.perf_counter(), float(parts.progress.elapsed.numpy())
        self._last_commit = time.monotonic()

    def due(self, chunk: Chunk) -> bool:
        """At `checkpoint.every_steps`, or `checkpoint.every_seconds` after the
        last commit; not at an epoch's end, which commits once validated."""
        ckpt = self.cfg.checkpoint
        # On spot capacity what a reclaim costs is time, which a step count
        # does not bound; time is looked at only between compiled calls.
        time_due = ckpt.every_seconds is not None and time.monotonic() - self._last_commit >= ckpt.every_seconds
        return (chunk.step % ckpt.every_steps == 0 or time_due) and not chunk.ends_epoch

    def commit(self, **fields) -> None:
        """A checkpoint of the step reached, `fields` added to its record."""
        self._last_commit = time.monotonic()
        progress = self.parts.progress
        progress.elapsed.assign(self._before + time.perf_counter() - self._started)
        if not self.is_chief:
            return
        if self.lease is not None and self.lease.lost:
            raise StorageError(f"another run took the lease on {self.cfg.checkpoint.uri}; stopping without writing")
        self.record = self.store.save(self.parts.checkpoint, int(progress.step.numpy()), self.record,
                                      finished=False, steps_per_epoch=self.parts.stream.steps_per_epoch,
                                      stopped_early=bool(progress.stopped_early.numpy()),
                                      **self.annotate(), **fields)


class Lease:
    """Keeps two runs from writing one `checkpoint.uri`.

    The holder rewrites `lease.json` every `seconds / 3`. A newcomer that
    finds someone else's lease watches it for up to `seconds`: if it is
    renewed, its holder is alive and the newcomer refuses; if not, the holder
    died (kill -9, lost node) and the newcomer takes over. Clocks are only
    used to skip the wait when the lease is plainly stale.
    """

    def __init__(self, checkpoint_uri: str, seconds: float, say=print):
        self.uri = storage.join(checkpoint_uri, "lease.json")
        self.seconds = seconds
        self.backend = storage.backend(checkpoint_uri, "checkpoint.uri")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.say = say
        self.lost = False
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        raw = self.backend.read_bytes(self.uri)
        return json.loads(raw) if raw else None

    def _write(self) -> None:
        self._beats += 1
        body = {"owner": self.owner, "beat": self._beats, "renewed_at": time.time(), "seconds": self.seconds}
        self.backend.write_bytes(self.uri, json.dumps(body).encode())

    def acquire(self) -> None:
        held = self._read()
        if held and held["owner"] != self.owner and time.time() - held["renewed_at"] < held["seconds"]:
            self.say(f"{self.uri} is held by {held['owner']}; watching it for up to {held['seconds']:.0f}s "
                     f"to see whether that run is still alive")
            deadline = time.monotonic() + held["seconds"]
            while time.monotonic() < deadline:
                time.sleep(min(1.0, held["seconds"] / 4))
                now = self._read()
                if now is None:
                    break
                if (now["owner"], now["beat"]) != (held["owner"], held["beat"]):
                    raise ConfigError(
                        f"another run ({now['owner']}) is using checkpoint.uri {self.uri.rsplit('/', 1)[0]}; "
                        f"two runs on one checkpoint.uri would overwrite each other's checkpoints")
        self._write()
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                now = self._read()
                if now and now["owner"] != self.owner:
                    self.lost = True
                    return
                self._write()
            except StorageError:
                pass  # an outage: the next beat tries again; the lease outlives a few misses

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if not self.lost:
            try:
                self.backend.delete_object(self.uri)
            except StorageError:
                pass  # it expires by itself
