"""Fail fast and clean (issue 23): a location the job cannot write is found
before training; a storage failure at any point (a full disk, a read-only
mount, a denied write, a quota, S3 refusing) exits 4 with one line naming the
config key, the path or object and the cause; nothing half-written is left
named as complete, and no staging is left behind; a malformed S3 URI or a
duplicate YAML key is a config error (2). Full disks and read-only mounts are
real tmpfs mounts, so those tests need root (they skip, saying so, without)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from helpers import pixels, small_overrides, wait_until
from job import checkpoints, export, model, storage
from job.config import load_config
from job.errors import ConfigError, JobError, StorageError
from job.report import Console
from s3proxy import S3Proxy

REPO = Path(__file__).resolve().parents[1]
PIXELS = pixels(4, seed=3)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, read_only): a real tmpfs of `size` under tmp_path; unmounted after the test."""
    if not IS_ROOT:
        pytest.skip("needs root to mount a small tmpfs (a real full disk or read-only mount)")
    mounted = []

    def mount(name: str, size: str = "1m", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its file system is full."""
    with open(folder / "padding", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 65536):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def leftovers(root: Path) -> list[Path]:
    """Staging, probe markers and half-written temporary files under root."""
    return [p for p in root.rglob(".*") if p.name.startswith((".staging-", ".probe-", ".latest.json."))]


def job(*sets: str, env: dict | None = None, prefix: tuple[str, ...] = ()):
    cmd = [*prefix, sys.executable, "-m", "job", "train", *sum((["--set", s] for s in sets), [])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()


def one_error_line(stderr: str, *needles: str) -> str:
    """The job's error: exactly one line, no traceback, holding each needle."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("cifar-job: error:")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_whole_latest(ckpt: Path) -> dict:
    """latest.json names a checkpoint that is all there: its index, data and record."""
    latest = json.loads((ckpt / "latest.json").read_text())
    folder = ckpt / latest["checkpoint"]
    assert (folder / "ckpt.index").is_file() and (folder / checkpoints.RECORD).is_file()
    assert list(folder.glob("ckpt.data-*"))
    return latest


# Far longer than it takes to break the disk under the run: it is stopped there.
LONG = {"train.epochs": 30}


def frozen(proc: subprocess.Popen, root: Path, action) -> None:
    """Run `action` while the job is stopped between two writes under root:
    none in flight (a read-only mount could not lose it), so what is left
    after is the job's own doing."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        if proc.poll() is not None or not leftovers(root):
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    try:
        action()
    finally:
        proc.send_signal(signal.SIGCONT)


def read_only_over(folder: Path) -> None:
    """A read-only bind mount of `folder` on itself: what the job opens there
    from now on is on a read-only mount. (Remounting the tmpfs itself read-only
    is refused while the job holds its TensorBoard file open for writing.)"""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- config errors: exit 2, naming the key, touching no storage ----------------------------------

@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://My_Bucket/x", "s3://ab/x", "s3://a..b/x",
                                 "s3://192.168.1.1/x", "s3://-bucket/x", "gs://bucket/x"])
@pytest.mark.parametrize("key", ["checkpoint.uri", "export.uri", "model.init_from", "checkpoint.resume_from"])
def test_a_malformed_uri_is_a_config_error_naming_the_key(key, uri):
    with pytest.raises(ConfigError, match=rf"^invalid config:\n  {re.escape(key)}: .*(bucket|scheme)") as err:
        load_config(None, [f"{key}={uri}"])
    assert err.value.exit_code == 2


def exits_2_touching_nothing(tmp_path, command: str, uri: str) -> None:
    # An endpoint where nothing answers: a job that tried to reach it would exit 4, not 2.
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
           "PYTHONPATH": str(REPO)}  # run from tmp_path, so that anything written there shows
    done = subprocess.run([sys.executable, "-m", "job", command, "--set", f"checkpoint.uri={uri}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "checkpoint.uri" in done.stderr
    assert "s3:/lease.json" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://Bad_Bucket/x"])
def test_a_malformed_s3_uri_exits_2_from_check_config(tmp_path, uri):
    exits_2_touching_nothing(tmp_path, "check-config", uri)


@pytest.mark.slow  # imports TensorFlow, as train does before it reads the config
def test_a_malformed_s3_uri_exits_2_from_train_without_touching_storage(tmp_path):
    exits_2_touching_nothing(tmp_path, "train", "s3://")


def test_a_valid_s3_uri_passes_the_config_check():
    assert load_config(None, ["checkpoint.uri=s3://my-bucket.example-1/runs/a"]).checkpoint.uri


def test_a_duplicate_yaml_key_exits_2_naming_it_and_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 30\nseed: 1\n")
    done = subprocess.run([sys.executable, "-m", "job", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    line = one_error_line(done.stderr, "train.epochs", "lines 2 and 4", str(path))
    assert "appears twice" in line


def test_a_duplicate_top_level_section_is_an_error_and_anchors_and_merge_keys_still_load(tmp_path):
    from job.config import read_yaml

    path = tmp_path / "run.yaml"
    path.write_text("train: {epochs: 3}\nseed: 1\ntrain: {batch_size: 8}\n")
    with pytest.raises(ConfigError, match="'train' appears twice, on lines 1 and 3"):
        load_config(path)
    # An alias repeats a mapping, and a key beside a merge key overrides it: neither is a duplicate.
    path.write_text("base: &b {epochs: 3, batch_size: 8}\nagain: *b\ntrain:\n  <<: *b\n  epochs: 5\n")
    assert read_yaml(path)["train"] == {"epochs": 5, "batch_size": 8}


def test_a_duplicate_key_inside_a_set_value_is_an_error():
    with pytest.raises(ConfigError, match="'epochs' appears twice"):
        load_config(None, ["train={epochs: 2, epochs: 3}"])


# --- the preflight: every location checked before anything is built ------------------------------

def check(*sets: str) -> None:
    from job import controller

    controller.check_locations(load_config(None, list(sets)), Console("text", stream=io.StringIO()))


def test_the_preflight_writes_and_removes_a_marker_in_each_location_leaving_nothing(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(Path, "write_bytes", lambda self, data, real=Path.write_bytes: (
        written.append(self.parent.relative_to(tmp_path).as_posix()), real(self, data))[1])
    (tmp_path / "ckpt").mkdir()
    check(f"checkpoint.uri={tmp_path / 'ckpt'}", f"export.uri={tmp_path / 'export'}")
    assert written == ["ckpt", "export/cifar10"]
    # The folders it made for the markers are gone again; the one that was there stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and not list((tmp_path / "ckpt").iterdir())


@pytest.mark.parametrize("blocked", ["export", "export/cifar10"])
def test_a_file_where_the_export_folder_should_be_fails_the_preflight(tmp_path, blocked):
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text("not a folder")
    with pytest.raises(StorageError, match=r"^export\.uri: cannot write .*(Not a directory|not a folder)") as err:
        check(f"checkpoint.uri={tmp_path / 'ckpt'}", f"export.uri={tmp_path / 'export'}")
    assert err.value.exit_code == 4 and not err.value.transient


def test_a_read_only_mount_fails_the_preflight(tmpfs, tmp_path):
    ro = tmpfs("ro", read_only=True)
    with pytest.raises(StorageError, match=r"^checkpoint\.uri: cannot write .*: Read-only file system$"):
        check(f"checkpoint.uri={ro / 'ckpt'}", f"export.uri={tmp_path / 'export'}")
    with pytest.raises(StorageError, match=r"^export\.uri: cannot write .*: Read-only file system$"):
        check(f"checkpoint.uri={tmp_path / 'ckpt'}", f"export.uri={ro}")


def test_the_preflight_on_s3_puts_and_deletes_a_marker(s3):
    check(f"checkpoint.uri=s3://{s3}/ckpt", f"export.uri=s3://{s3}/models")
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=s3)


def test_a_missing_bucket_fails_the_preflight_naming_the_key(s3):
    with pytest.raises(StorageError, match=r"^export\.uri: cannot write s3://no-such-bucket-x/models/.*NoSuchBucket"):
        check(f"checkpoint.uri=s3://{s3}/ckpt", "export.uri=s3://no-such-bucket-x/models")


def test_a_bucket_that_refuses_writes_fails_the_preflight_at_once(s3, s3_server, monkeypatch):
    proxy = S3Proxy(s3_server)
    try:
        proxy.fail("PUT", rf"^/{s3}/models/", status=403, code="AccessDenied")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"^export\.uri: cannot write .*AccessDenied") as err:
            check(f"checkpoint.uri=s3://{s3}/ckpt", f"export.uri=s3://{s3}/models")
        assert time.monotonic() - started < 10 and not err.value.transient
    finally:
        proxy.close()


@pytest.mark.slow
def test_train_stops_at_the_preflight_before_any_training(tmpfs, tmp_path):
    ro = tmpfs("ro", read_only=True)
    started = time.monotonic()
    out, err = finish(job(*small_overrides(tmp_path, **{"export.uri": ro / "export"})))
    seconds = time.monotonic() - started
    one_error_line(err, "export.uri", str(ro / "export"), "Read-only file system")
    assert not re.search(r"^data: \d+ train", out, re.M) and "compiled the training step" not in out
    assert not (tmp_path / "ckpt" / "latest.json").exists()
    assert seconds < 60, seconds  # TensorFlow's import is most of it
    print(f"preflight failure after {seconds:.1f}s")


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"), reason="needs root and setpriv to drop "
                    "CAP_DAC_OVERRIDE (root ignores permission bits otherwise)")
def test_a_folder_the_job_may_not_write_fails_the_preflight(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    drop = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")
    out, err = finish(job(*small_overrides(tmp_path, **{"checkpoint.uri": locked / "ckpt"}), prefix=drop))
    one_error_line(err, "checkpoint.uri", str(locked / "ckpt"), "Permission denied")
    assert "compiled the training step" not in out


# --- failures later in a run: exit 4, one line, nothing half-written named complete ---------------

def test_a_checkpoint_on_a_full_disk_is_a_storage_error_and_leaves_no_staging(tmpfs):
    import tensorflow as tf

    full = tmpfs("full", size="256k")
    store = checkpoints.CheckpointStore(str(full / "ckpt"), 3, checkpoints.Uploader(1.0))
    net = model.build("simple_cnn")
    with pytest.raises(StorageError, match=r"^checkpoint\.uri: cannot write .*: No space left on device$") as err:
        store.save(tf.train.Checkpoint(model=net), 10, None)
    assert not err.value.transient
    assert leftovers(full) == [] and not (full / "ckpt" / "latest.json").exists()


def test_latest_json_on_a_full_disk_keeps_the_old_one_and_leaves_no_temporary_file(tmpfs):
    full = tmpfs("full", size="64k")
    latest = full / "latest.json"
    latest.write_text('{"step": 10}')
    fill(full)
    with pytest.raises(StorageError, match="No space left on device"):
        storage.LocalStorage().write_bytes(str(latest), json.dumps({"step": 20, "pad": "x" * 100_000}).encode())
    assert json.loads(latest.read_text()) == {"step": 10} and leftovers(full) == []


def test_an_export_to_a_full_disk_is_a_storage_error_and_leaves_no_staging(tmpfs):
    full = tmpfs("full", size="256k")
    with pytest.raises(StorageError, match=r"^export\.uri: cannot write .*: No space left on device$"):
        export.export(model.build("simple_cnn"), str(full), "m", {}, PIXELS)
    assert leftovers(full) == [] and storage.LocalStorage().published(str(full / "m")) == []


def test_an_export_that_fails_its_check_leaves_no_staging(tmp_path, monkeypatch):
    def refuse(*args):
        raise JobError("export check failed")

    monkeypatch.setattr(export, "verify", refuse)
    with pytest.raises(JobError, match="export check failed"):
        export.export(model.build("simple_cnn"), str(tmp_path), "m", {}, PIXELS)
    assert leftovers(tmp_path) == [] and storage.LocalStorage().published(str(tmp_path / "m")) == []


def test_a_quota_is_a_permanent_storage_error_not_retried(tmp_path, monkeypatch):
    def over_quota(self, data):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(self))

    monkeypatch.setattr(Path, "write_bytes", over_quota)
    uploader = checkpoints.Uploader(retry_seconds=300)
    store = checkpoints.CheckpointStore(str(tmp_path / "ckpt"), 3, uploader)
    started = time.monotonic()
    store.write_later("metrics.jsonl", b"{}\n")
    with pytest.raises(StorageError, match=r"^checkpoint\.uri: cannot write .*metrics.jsonl.*: Disk quota exceeded$"):
        uploader.flush()
    assert time.monotonic() - started < 5  # not checkpoint.retry_seconds


def test_an_s3_refusal_is_not_retried_but_an_outage_is(s3):
    backend = storage.backend(f"s3://{s3}")
    started = time.monotonic()
    with pytest.raises(StorageError, match="NoSuchBucket") as err:
        storage.retry(backend.write_bytes, "s3://no-such-bucket-y/x", b"x", seconds=300)
    assert not err.value.transient and time.monotonic() - started < 10
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise StorageError("connection refused")
        return "done"

    assert storage.retry(flaky, seconds=30) == "done" and len(calls) == 3


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_exits_4_and_latest_names_a_whole_checkpoint(tmpfs, tmp_path):
    disk = tmpfs("disk", size="16m")
    proc = job(*small_overrides(tmp_path, **{"checkpoint.uri": disk / "ckpt", **LONG}))
    try:
        wait_until(lambda: (disk / "ckpt" / "latest.json").exists() or proc.poll() is not None)
        frozen(proc, disk, lambda: fill(disk))
        out, err = finish(proc)
    finally:
        proc.kill()
    assert proc.returncode == 4, err
    one_error_line(err, "checkpoint.uri", str(disk / "ckpt"), "No space left on device")
    (disk / "padding").unlink()
    assert_whole_latest(disk / "ckpt")
    assert leftovers(disk) == []


@pytest.mark.slow
def test_a_mount_turned_read_only_mid_run_exits_4_and_latest_names_a_whole_checkpoint(tmpfs, tmp_path):
    disk = tmpfs("disk", size="64m")
    proc = job(*small_overrides(tmp_path, **{"checkpoint.uri": disk / "ckpt", **LONG}))
    try:
        wait_until(lambda: (disk / "ckpt" / "latest.json").exists() or proc.poll() is not None)
        frozen(proc, disk, lambda: read_only_over(disk / "ckpt"))
        out, err = finish(proc)
    finally:
        proc.kill()
        subprocess.run(["umount", "-l", str(disk / "ckpt")], check=False)
    assert proc.returncode == 4, err
    one_error_line(err, "checkpoint.uri", str(disk / "ckpt"), "Read-only file system")
    assert_whole_latest(disk / "ckpt")
    assert leftovers(disk) == []


@pytest.mark.slow
def test_an_export_that_fills_the_disk_exits_4_naming_export_uri_and_leaves_no_staging(tmpfs, tmp_path):
    full = tmpfs("full", size="256k")
    out, err = finish(job(*small_overrides(tmp_path, **{"export.uri": full, "train.epochs": 1})))
    one_error_line(err, "export.uri", str(full), "No space left on device")
    assert leftovers(full) == [] and storage.LocalStorage().published(str(full / "cifar10")) == []
    latest = assert_whole_latest(tmp_path / "ckpt")
    assert not latest["finished"]


# --- exported versions are readable by other users --------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_exported_folders_and_files_take_the_modes_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        _, uri = export.export(model.build("simple_cnn"), str(tmp_path), "m", {}, PIXELS)
    finally:
        os.umask(previous)
    root = Path(uri)
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    for rel, mode in modes.items():
        want = (0o777 if (root / rel).is_dir() else 0o666) & ~umask
        assert mode == want, (rel, oct(mode), oct(want))


def test_committed_checkpoints_are_readable_by_others(tmp_path):
    import tensorflow as tf

    uploader = checkpoints.Uploader(5)
    store = checkpoints.CheckpointStore(str(tmp_path / "ckpt"), 3, uploader)
    store.save(tf.train.Checkpoint(model=model.build("simple_cnn")), 10, None)
    uploader.flush()
    folder = tmp_path / "ckpt" / "ckpt-10"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~current_umask()


# --- the export retries through an outage as long as checkpoint commits do ------------------------

@pytest.mark.slow
def test_the_export_retries_through_an_s3_outage_for_checkpoint_retry_seconds(s3, s3_server, tmp_path,
                                                                               monkeypatch, run_job):
    proxy = S3Proxy(s3_server)
    try:
        # Every upload of the version fails for 8 s from the first: far past boto3's own attempts.
        outage = proxy.fail("PUT", rf"^/{s3}/models/cifar10/1/", status=503, code="SlowDown", seconds=8)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        result, out = run_job(small_overrides(tmp_path, **{"export.uri": f"s3://{s3}/models", "train.epochs": 1,
                                                           "checkpoint.retry_seconds": 60}))
    finally:
        proxy.close()
    assert outage.answered >= 3
    assert result.version == 1 and storage.backend(result.model_uri).published(f"s3://{s3}/models/cifar10") == ["1"]
    print(f"503 answers before the export went through: {outage.answered}")
