"""MLflow tracking (job/tracking.py): one MLflow run per job run however often it is killed and
resumed, each epoch logged once, and a tracking server that is down or refuses never failing or
changing the training. The slow tests run a real `mlflow server` on 127.0.0.1 with a local store."""

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from helpers import SECRET, free_port, small_overrides, url_ready, wait_until
from job import tracking
from job.config import load_config
from job.errors import ConfigError

# Long enough (several seconds) to be interrupted on purpose: 125 steps an epoch.
LONG = {"data.synthetic.train_size": 4200, "train.epochs": 3, "checkpoint.every_steps": 10,
        "checkpoint.lease_seconds": 3}
STEPS_PER_EPOCH = (4200 - 200) // 32


# -- Fast: what is logged, without a server --

def test_params_are_the_config_flattened_and_redacted():
    presigned = f"https://bucket.example/cifar.tar.gz?X-Amz-Signature={SECRET}&X-Amz-Expires=60"
    cfg = load_config(None, ["data.source=cifar10", f"data.uri={presigned}", "train.epochs=3"])
    flat = tracking.params(cfg)
    assert flat["train.epochs"] == "3" and flat["train.lr_schedule.name"] == "constant"
    assert flat["data.uri"].startswith("https://bucket.example/cifar.tar.gz?X-Amz-Signature=***")
    assert SECRET not in json.dumps(flat)
    assert len(flat) == len(tracking.flatten(cfg.model_dump(mode="json")))


def test_values_are_clipped_to_mlflows_limit_and_redacted():
    values = {"long": "x" * 600, "short": "y", "url": f"http://user:{SECRET}@host/x"}
    clipped = tracking.clipped(values, 500)
    assert len(clipped["long"]) == 500 and clipped["long"].endswith("...") and clipped["short"] == "y"
    assert clipped["url"] == "http://***@host/x"


def test_lineage_becomes_prefixed_tags_whatever_its_fields():
    lineage = {"code_revision": "abc123", "job": {"platform": "aws-batch", "ids": {"job_id": "j-1"}},
               "data": {"uri": f"s3://b/d?token={SECRET}", "checksum": "sha256:00"},
               "versions": {"tensorflow": "2.21.0"}, "checkpoint": None}
    tags = tracking.lineage_tags(lineage)
    assert tags == {"lineage.code_revision": "abc123", "lineage.job.platform": "aws-batch",
                    "lineage.job.ids.job_id": "j-1", "lineage.data.uri": "s3://b/d?token=***",
                    "lineage.data.checksum": "sha256:00", "lineage.versions.tensorflow": "2.21.0",
                    "lineage.checkpoint": "null"}


def test_epoch_metrics_are_metrics_jsonls_numbers():
    record = {"epoch": 2, "step": 250, "loss": 0.5, "accuracy": 0.8, "val_loss": None, "val_accuracy": None,
              "seconds": 1.5}
    assert tracking.epoch_metrics(record) == {"epoch": 2.0, "loss": 0.5, "accuracy": 0.8, "seconds": 1.5}


def test_the_config_key_beats_the_environment_and_neither_means_off():
    cfg, on = load_config(None, []), load_config(None, ["tracking.mlflow_uri=http://127.0.0.1:5000"])
    assert tracking.tracking_uri(cfg, {}) is None
    assert tracking.tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "http://a:1"}) == "http://a:1"
    assert tracking.tracking_uri(on, {"MLFLOW_TRACKING_URI": "http://a:1"}) == "http://127.0.0.1:5000"


def test_a_resumed_run_keeps_its_key_and_a_restart_from_a_chosen_checkpoint_gets_a_new_one():
    kept = {"run_key": "k1", "mlflow_run_id": "r1", "experiment_id": "1"}
    assert tracking.run_fields({"tracking": kept}, restarted=False) == kept
    assert tracking.run_fields({"tracking": kept}, restarted=True)["run_key"] != "k1"
    assert tracking.run_fields(None, restarted=False).keys() == {"run_key"}


def test_tracking_asked_for_without_the_client_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(ConfigError, match=r"mlflow client is not installed.*\[tracking\]") as caught:
        tracking.Tracker(f"http://u:{SECRET}@127.0.0.1:1", "e", {"run_key": "k"}, print, 1.0)
    assert caught.value.exit_code == 2 and SECRET not in str(caught.value)


def test_the_client_is_an_extra_of_the_training_image_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any(d.startswith("mlflow") for d in project["dependencies"] + extras["train"] + extras["serve-libs"])
    assert len(extras["tracking"]) == 1 and extras["tracking"][0].startswith("mlflow-skinny")
    installs = re.findall(r'pip install "\.\[([^\]]*)\]"', (ROOT / "Dockerfile.train").read_text())
    assert "tracking" in installs[0].split(",")
    assert "tracking" not in (ROOT / "Dockerfile.serve").read_text()


# -- Slow: a real tracking server --

ROOT = Path(__file__).resolve().parents[1]


def _mlflow_bin() -> str:
    """MLflow's server, from a venv of its own that `make test` makes: the whole of MLflow pins an older
    gunicorn than the service's image ships, and .venv has only its client (mlflow-skinny, which cannot serve)."""
    found = shutil.which("mlflow", path=str(ROOT / ".venv-mlflow" / "bin"))
    if not found:
        pytest.skip("needs the mlflow package in .venv-mlflow for `mlflow server`: make .venv-mlflow/.installed")
    return found


def start_mlflow(root, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port, its store (SQLite) and artifacts under `root`; not waited for."""
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [_mlflow_bin(), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A tracking server for the module's tests: its URI."""
    port = free_port()
    proc = start_mlflow(tmp_path_factory.mktemp("mlflow"), port)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: url_ready(f"{uri}/health") or proc.poll() is not None, timeout=90,
                   what="mlflow server to answer")
        assert proc.poll() is None, "mlflow server exited at start"
        yield uri
    finally:
        stop(proc)


def job_command(tmp_path, **extra) -> list[str]:
    sets = small_overrides(tmp_path, **{**LONG, **extra})
    return [sys.executable, "-m", "job", "train", *sum((["--set", s] for s in sets), [])]


def job_env(uri: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("CIFAR_", "MLFLOW_"))},
            "MLFLOW_TRACKING_URI": uri}


def said(out: str) -> list[str]:
    """What the job said of tracking."""
    return [line for line in out.splitlines() if line.startswith("tracking: ")]


def epochs_logged(uri: str, experiment: str) -> list[int]:
    """The steps of every epoch logged in `experiment` so far, in any run (none before the run opens)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [m.step for r in runs for m in client.get_metric_history(r.info.run_id, tracking.STEP_KEY)]


def metrics_jsonl(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]


def the_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def assert_every_epoch_once(client, run, records: list[dict]) -> None:
    for key in ("loss", "accuracy", "val_loss", "epoch"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [r["step"] for r in records], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in records]), key


@pytest.mark.slow
def test_a_killed_and_resumed_run_is_one_mlflow_run_with_every_epoch_once(tmp_path, mlflow_server):
    cmd = job_command(tmp_path, **{"tracking.experiment": "kill9"})
    # As AWS Batch runs it: the platform's ids, and the image `submit aws-batch` names.
    env = {**job_env(mlflow_server), "AWS_BATCH_JOB_ID": "job-28", "AWS_BATCH_JOB_ATTEMPT": "2",
           "CIFAR_IMAGE": "registry.example/cifar10-pipeline-train:1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = tmp_path / "ckpt" / "latest.json"
    # Past the first epoch's commit, mid-way through the second.
    wait_until(lambda: latest.exists() and json.loads(latest.read_text())["step"] > STEPS_PER_EPOCH + 10,
               timeout=300, interval=0.05, what="a checkpoint inside the second epoch")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    # The epoch committed before the kill may or may not have reached MLflow yet: the resumed run logs it if not.
    held = len(epochs_logged(mlflow_server, "kill9"))
    assert held <= 1

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {killed_at}" in resumed.stdout
    client, run = the_run(mlflow_server, "kill9")
    # The server was up: the run named, nothing else to report.
    assert said(resumed.stdout) == [f"tracking: MLflow run {run.info.run_id} (experiment 'kill9') at "
                                     f"{mlflow_server}" + (f", which holds {held} of its epochs" if held else "")]

    record = json.loads(latest.read_text())
    assert record["tracking"]["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
    records = metrics_jsonl(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert_every_epoch_once(client, run, records)
    assert run.data.params["train.epochs"] == "3" and run.data.params["checkpoint.uri"] == str(tmp_path / "ckpt")
    tags = run.data.tags
    card = json.loads((tmp_path / "export" / "cifar10" / "1" / "assets.extra" / "model_card.json").read_text())
    # Every lineage field that applies here, in the card and as the run's tags.
    lineage = card["lineage"]
    assert lineage["code_revision"] and lineage["image"] == "registry.example/cifar10-pipeline-train:1"
    assert (lineage["job"]["platform"], lineage["job"]["id"], lineage["job"]["attempt"]) == ("aws-batch", "job-28", 2)
    assert lineage["data"]["checksum"] == record["data_checksum"]
    assert lineage["checkpoint_uri"] == str(tmp_path / "ckpt") and lineage["created"]
    assert lineage["package_version"] and lineage["tensorflow_version"] and lineage["python_version"]
    assert {k: v for k, v in tags.items() if k.startswith("lineage.")} == tracking.lineage_tags(lineage)
    assert tags["export.uri"] == record["export"]["uri"] and tags["export.version"] == "1"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"curves.png", "model_card.json"}
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "model_card.json", str(tmp_path))).read())
    assert logged == card
    with open(client.download_artifacts(run.info.run_id, "curves.png", str(tmp_path)), "rb") as f:
        assert f.read() == (tmp_path / "ckpt" / "curves.png").read_bytes()


@pytest.mark.slow
def test_a_resumed_attempt_never_logs_a_step_the_run_holds_and_logs_those_it_lacks(tmp_path, mlflow_server):
    """Attempts as a kill -9 leaves them, at the calls the controller makes: each logs only the steps the
    MLflow run lacks, whatever it is handed."""
    cfg = load_config(None, small_overrides(tmp_path))
    epochs = [{"epoch": e, "step": 10 * e, "loss": 1.0 / e} for e in (1, 2, 3, 4)]

    def attempt(committed: list[dict], trained: list[dict]) -> tracking.Tracker:
        tracker = tracking.Tracker(mlflow_server, "dedup", {"run_key": "resume-me"}, print, 30)
        tracker.open(cfg, {}, committed)
        for record in trained:
            tracker.log_epoch(record)
        tracker.close("KILLED")
        return tracker

    # Epoch 2 reached MLflow though its checkpoint did not commit (a call that timed out, say), and
    # the next attempt, from epoch 1's checkpoint and not yet knowing the MLflow run's id, redoes it.
    first = attempt([], epochs[:2])
    second = attempt(epochs[:1], epochs[1:3])
    # Epoch 4's checkpoint committed, and the attempt was killed before its metrics were sent.
    third = attempt(epochs[:4], [])
    client, run = the_run(mlflow_server, "dedup")
    assert first.fields["mlflow_run_id"] == second.fields["mlflow_run_id"] == third.fields["mlflow_run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (10, 1.0), (20, 0.5), (30, pytest.approx(1 / 3)), (40, 0.25)]


@pytest.mark.slow
def test_a_restart_from_a_chosen_checkpoint_is_a_new_mlflow_run(tmp_path, mlflow_server, run_job, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    overrides = small_overrides(tmp_path, **{"tracking.experiment": "restart"})
    run_job(overrides)
    first = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    step = first["kept"][0]
    _, log = run_job([*overrides, f"checkpoint.resume_from={step}"])
    assert f"resumed from step {step}" in log
    second = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    assert second["tracking"]["mlflow_run_id"] != first["tracking"]["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    records = metrics_jsonl(tmp_path)
    for record, restarted in ((first, None), (second, str(tmp_path / "ckpt" / f"ckpt-{step}"))):
        run = client.get_run(record["tracking"]["mlflow_run_id"])
        assert run.data.tags.get("restarted_from") == restarted and run.info.status == "FINISHED"
        # The restarted run holds the epochs before its restart point too, from metrics.jsonl.
        assert_every_epoch_once(client, run, records)


@pytest.fixture(scope="module")
def untracked(tmp_path_factory):
    """The run the tracked ones must equal: the same config, no tracking; its directory."""
    root = tmp_path_factory.mktemp("untracked")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIFAR_", "MLFLOW_"))}
    done = subprocess.run(job_command(root), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    return root


def assert_same_training(tmp_path, baseline) -> None:
    ours, theirs = json.loads((tmp_path / "ckpt" / "latest.json").read_text()), \
        json.loads((baseline / "ckpt" / "latest.json").read_text())
    assert ours["export"]["test_accuracy"] == theirs["export"]["test_accuracy"]
    assert [r["loss"] for r in metrics_jsonl(tmp_path)] == [r["loss"] for r in metrics_jsonl(baseline)]


@pytest.mark.slow
def test_a_tracking_server_that_comes_up_late_gets_the_whole_run(tmp_path, untracked):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = job_command(tmp_path, **{"tracking.experiment": "late", "tracking.exit_seconds": 120})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env(uri))
    server = None
    try:
        latest = tmp_path / "ckpt" / "latest.json"
        wait_until(lambda: latest.exists() and json.loads(latest.read_text())["step"] >= STEPS_PER_EPOCH,
                   timeout=300, what="the first epoch's checkpoint")
        server = start_mlflow(tmp_path / "mlflow", port)  # down until now
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        lines = said(out)
        # One line when it fails, none per call; then where the run went, and that the server is back.
        assert len(lines) == 3 and "failed" in lines[0], lines
        assert "Traceback" not in err
        assert_same_training(tmp_path, untracked)
        client, run = the_run(uri, "late")
        assert sorted(lines[1:]) == [f"tracking: MLflow run {run.info.run_id} (experiment 'late') at {uri}",
                                     f"tracking: {uri} answers again; catching up"]
        # Opened after the run's last checkpoint, found by the key every checkpoint holds.
        record = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
        assert run.data.tags[tracking.TAG_RUN_KEY] == record["tracking"]["run_key"]
        assert run.info.status == "FINISHED"
        assert_every_epoch_once(client, run, metrics_jsonl(tmp_path))
    finally:
        if proc.poll() is None:
            proc.kill()
        if server:
            stop(server)


class Refuse(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        self.send_response(403 if self.command == "GET" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _refuse

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_tracking_server_that_refuses_changes_nothing_and_holds_the_exit_briefly(tmp_path, untracked):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://user:{SECRET}@127.0.0.1:{server.server_port}"
    try:
        started = time.monotonic()
        done = subprocess.run(job_command(tmp_path, **{"tracking.exit_seconds": 2}), capture_output=True,
                              text=True, timeout=600, env=job_env(uri))
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    lines = said(done.stdout)
    assert len(lines) == 2 and "failed" in lines[0] and "tracking.exit_seconds (2s)" in lines[1], lines
    assert SECRET not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert_same_training(tmp_path, untracked)
    assert took < 300


def test_what_waits_for_commits_runs_after_them_and_never_after_one_that_gave_up(tmp_path):
    from job.checkpoints import CheckpointStore, Uploader

    store, calls = CheckpointStore(str(tmp_path), keep=1, uploader=Uploader(retry_seconds=0.1)), []
    store.write_later("metrics.jsonl", b"{}\n")
    store.after_commits(lambda: calls.append((tmp_path / "metrics.jsonl").exists()))
    store.flush()
    assert calls == [True]
    (tmp_path / "blocked").mkdir()  # a write that cannot land: a folder where the file goes
    store.write_later("blocked", b"x")
    store.after_commits(lambda: calls.append("after a failed write"))
    with pytest.raises(Exception, match="blocked"):
        store.flush()
    assert calls == [True]
