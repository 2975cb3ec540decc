"""Checkpoints that a crash can never leave half-written.

A checkpoint is staged locally, published as `ckpt-<step>/` in one step, and
only then named by `latest.json`. Whatever a killed run leaves behind is
either complete and named, or ignored and cleaned up by the next commit.
TensorFlow's CheckpointManager is not used: its state file and deletion
assume one local filesystem and write the index before the data is safe
in remote storage.
"""

from __future__ import annotations

import json
import time

import tensorflow as tf

from job import storage


class CheckpointStore:
    def __init__(self, uri: str, keep: int):
        self.uri = uri
        self.keep = keep
        self.backend = storage.backend(uri)

    @property
    def latest_uri(self) -> str:
        return storage.join(self.uri, "latest.json")

    def latest(self) -> dict | None:
        raw = self.backend.read_bytes(self.latest_uri)
        return json.loads(raw) if raw else None

    def save(self, checkpoint: tf.train.Checkpoint, step: int, previous: dict | None, **fields) -> dict:
        """Write, publish and commit the checkpoint of `step`; return the new latest.json."""
        staged = self.backend.staging(self.uri)
        checkpoint.write(str(staged / "ckpt"))
        self.backend.publish(staged, storage.join(self.uri, f"ckpt-{step}"), replace=True)
        kept = [s for s in (previous or {}).get("kept", []) if s != step] + [step]
        record = {**(previous or {}), **fields, "step": step, "checkpoint": f"ckpt-{step}",
                  "kept": kept[-self.keep:], "committed_at": time.time()}
        self.backend.write_bytes(self.latest_uri, json.dumps(record, indent=2).encode())
        self._prune(record)
        return record

    def update(self, previous: dict, **fields) -> dict:
        record = {**previous, **fields}
        self.backend.write_bytes(self.latest_uri, json.dumps(record, indent=2).encode())
        return record

    def restore(self, checkpoint: tf.train.Checkpoint, step: int) -> None:
        local = self.backend.local_copy(storage.join(self.uri, f"ckpt-{step}"))
        checkpoint.read(str(local / "ckpt")).assert_existing_objects_matched().expect_partial()

    def _prune(self, record: dict) -> None:
        # Only after the newer checkpoint is committed, and never the best one.
        wanted = {f"ckpt-{s}" for s in record["kept"]}
        if record.get("best"):
            wanted.add(f"ckpt-{record['best']['step']}")
        for name in self.backend.published(self.uri):
            if name.startswith("ckpt-") and name not in wanted:
                self.backend.delete(storage.join(self.uri, name))
        self.backend.clean_staging(self.uri)
