"""The checkpoint store on its own: commits in the background, in order, and
nothing a commit does touches the checkpoint being staged next."""

import json
import threading

import tensorflow as tf

from job.checkpoints import CheckpointStore, Uploader


def test_a_commit_never_removes_the_next_checkpoint_being_staged(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=1, uploader=Uploader(retry_seconds=5))
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    gate = threading.Event()
    store._uploader.submit(gate.wait)  # holds the uploader
    first = store.save(checkpoint, 1, None)
    store.save(checkpoint, 2, first)  # staged while the first waits to commit
    gate.set()
    assert store.flush(timeout=30)
    latest = json.loads((tmp_path / "latest.json").read_text())
    # Cleaning leftovers after each commit used to take the second's staging directory with it,
    # and latest.json then named a checkpoint that was never published.
    assert latest["checkpoint"] == "ckpt-2" and (tmp_path / "ckpt-2").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".staging", "ckpt-"))) == ["ckpt-2"]


def test_a_run_starts_by_dropping_what_a_killed_run_staged(tmp_path):
    (tmp_path / ".staging-crashed").mkdir()
    store = CheckpointStore(str(tmp_path), keep=1, uploader=Uploader(retry_seconds=5))
    store.clean_staging()
    assert not (tmp_path / ".staging-crashed").exists()
