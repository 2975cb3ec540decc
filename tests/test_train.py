"""The training loop, checkpoints and resume, run in-process on small synthetic data."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from helpers import OUTPUTS_PROBE, latest, outputs, small_overrides
from job.errors import ConfigError, DivergedError

pytestmark = pytest.mark.slow  # every test here trains end to end

ROOT = Path(__file__).resolve().parents[1]


def metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_at", [17, 31], ids=["mid-epoch", "epoch-end"])
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, run_job, stop_at):
    # Augmentation, several steps per compiled call and a checkpoint cadence
    # that does not divide the epoch: the resume must still line up exactly.
    common = {"data.augment": "true", "train.steps_per_loop": 3, "checkpoint.every_steps": 7,
              "train.lr_schedule": "cosine", "train.lr_schedule.warmup_epochs": 0.5}
    whole, _ = run_job(small_overrides(tmp_path / "whole", **common))

    split = tmp_path / "split"
    first, _ = run_job(small_overrides(split, **common, **{"train.max_steps": stop_at}))
    assert first.step == stop_at
    second, log = run_job(small_overrides(split, **common))
    assert f"resumed from step {stop_at}" in log
    assert second.step == whole.step == 62
    np.testing.assert_array_equal(outputs(second.model_uri), outputs(whole.model_uri))
    timing = ("seconds", "images_per_second", "elapsed_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(metrics(split)) == strip(metrics(tmp_path / "whole"))
    # Time to accuracy counts the first attempt's committed time too: it keeps growing across the resume.
    elapsed = [r["elapsed_seconds"] for r in metrics(split)]
    assert all(b > a > 0 for a, b in zip(elapsed, elapsed[1:], strict=False)), elapsed


def recipe(name: str) -> dict:
    """A shipped config's training choices as --set values (where its data and outputs go left out)."""
    tree = yaml.safe_load((ROOT / "configs" / name).read_text())
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value
    walk(tree, "")
    return {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "train") or k in ("data.augment",
                                                                                          "data.translate",
                                                                                          "data.flip")}


def test_the_fast_recipe_resumes_bit_identical_between_two_lookahead_updates(tmp_path, run_job):
    # configs/cifar10-fast.yaml's switches (bfloat16, lookahead, alternating
    # flips, TTA, its schedule), on a narrow net and small batches; step 17
    # falls between two lookahead updates, whose slow weights the checkpoint
    # must carry.
    fast = {**recipe("cifar10-fast.yaml"), "model.width": 0.25, "train.batch_size": 32, "train.epochs": 2,
            "train.learning_rate": 0.1, "checkpoint.every_steps": 7}
    assert fast["train.lookahead.enabled"] and fast["train.lookahead.every_steps"] == 5
    whole, log = run_job(small_overrides(tmp_path / "whole", **fast))
    assert "evaluating and exporting in float32 (trained in mixed_bfloat16)" in log
    split = tmp_path / "split"
    run_job(small_overrides(split, **fast, **{"train.max_steps": 17}))
    second, log = run_job(small_overrides(split, **fast))
    assert "resumed from step 17" in log and second.step == whole.step == 62
    np.testing.assert_array_equal(outputs(second.model_uri), outputs(whole.model_uri))
    assert second.test_accuracy == whole.test_accuracy


def test_run_leaves_contract_files(tmp_path, run_job):
    result, log = run_job(small_overrides(tmp_path))
    ckpt = tmp_path / "ckpt"
    record = latest(tmp_path)
    assert record["step"] == result.step == 2 * (1000 // 32)
    assert record["finished"] is True and record["export"]["version"] == 1
    assert (ckpt / record["checkpoint"]).is_dir()
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second",
                    "elapsed_seconds"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), key
        assert row["images_per_second"] > 0
    # Wall time includes what the epochs' step time leaves out (compiling, validation, checkpoints).
    assert rows[1]["elapsed_seconds"] > rows[0]["elapsed_seconds"] >= rows[0]["seconds"] > 0
    card = json.loads((tmp_path / "export/cifar10/1/assets.extra/model_card.json").read_text())
    assert card["train_seconds"] >= rows[-1]["elapsed_seconds"] and card["test_accuracy"] == result.test_accuracy
    assert card["data_checksum"].startswith("sha256:")
    assert (ckpt / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epochs: 2" in (ckpt / "config.yaml").read_text()
    assert list((ckpt / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "export" / "cifar10" / "1" / "saved_model.pb").is_file()
    assert "test: accuracy" in log


def test_a_run_without_a_validation_split(tmp_path, run_job):
    result, log = run_job(small_overrides(tmp_path, **{"data.validation_size": 0}))
    rows = metrics(tmp_path)
    assert result.step == 2 * (1200 // 32) and len(rows) == 2
    assert rows[0]["val_loss"] is None and rows[0]["val_accuracy"] is None
    assert "val_loss" not in log and (tmp_path / "ckpt" / "curves.png").exists()


def test_rerunning_a_finished_run_does_nothing(tmp_path, run_job):
    first, _ = run_job(small_overrides(tmp_path, **{"train.epochs": 1}))
    again, log = run_job(small_overrides(tmp_path, **{"train.epochs": 1}))
    assert "nothing to do" in log and "resumed" not in log
    assert again.version == first.version == 1
    assert sorted(p.name for p in (tmp_path / "export" / "cifar10").iterdir()) == ["1"]


def test_raising_max_steps_carries_on(tmp_path, run_job):
    run_job(small_overrides(tmp_path, **{"train.max_steps": 5}))
    result, log = run_job(small_overrides(tmp_path, **{"train.max_steps": 12}))
    assert "resumed from step 5" in log and result.step == 12 and result.version == 2


def test_resume_with_a_changed_model_is_refused(tmp_path, run_job):
    run_job(small_overrides(tmp_path, **{"train.max_steps": 3}))
    with pytest.raises(ConfigError, match=r"model\.name.*simple_cnn.*resnet"):
        run_job(small_overrides(tmp_path, **{"model.name": "resnet"}))
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        run_job(small_overrides(tmp_path, **{"train.batch_size": 16}))


def test_a_checkpoint_of_an_earlier_network_revision_is_refused_by_name(tmp_path, run_job, monkeypatch):
    from job import model

    run_job(small_overrides(tmp_path, **{"train.max_steps": 3}))
    assert latest(tmp_path)["network_revision"] == model.REVISIONS["simple_cnn"] == 1
    # What a job release that changes simple_cnn's variables would do.
    monkeypatch.setitem(model.REVISIONS, "simple_cnn", 2)
    with pytest.raises(ConfigError, match=r"checkpoint\.uri: .* simple_cnn revision 1, .* builds revision 2"):
        run_job(small_overrides(tmp_path, **{"train.max_steps": 6}))
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match=r"model\.init_from: .* simple_cnn revision 1, .* builds revision 2"):
        run_job(small_overrides(fresh, **{"model.init_from": str(tmp_path / "ckpt")}))


def test_resume_policies(tmp_path, run_job):
    with pytest.raises(ConfigError, match="required"):
        run_job(small_overrides(tmp_path, **{"checkpoint.resume": "required"}))
    run_job(small_overrides(tmp_path, **{"train.max_steps": 4}))
    result, log = run_job(small_overrides(tmp_path, **{"train.max_steps": 4, "checkpoint.resume": "never"}))
    assert "resumed" not in log and result.step == 4


def test_retention_keeps_the_newest_and_the_best_and_drops_debris(tmp_path, run_job):
    ckpt = tmp_path / "ckpt"
    (ckpt / ".staging-crashed").mkdir(parents=True)
    (ckpt / "ckpt-9999").mkdir()  # published by a run that crashed before naming it
    run_job(small_overrides(tmp_path, **{"checkpoint.keep": 2, "train.epochs": 3}))
    record = latest(tmp_path)
    names = sorted(p.name for p in ckpt.iterdir() if p.name.startswith(("ckpt-", ".staging")))
    expected = {f"ckpt-{s}" for s in record["kept"]} | {f"ckpt-{record['best']['step']}"}
    assert set(names) == expected and len(record["kept"]) == 2


def test_nan_loss_stops_without_checkpointing_garbage(tmp_path, run_job):
    with pytest.raises(DivergedError, match="loss became") as info:
        run_job(small_overrides(tmp_path, **{"train.optimizer": "sgd", "train.learning_rate": 1e12}))
    bad_step = int(str(info.value).split(" at step ")[1].split(";")[0])
    if (tmp_path / "ckpt" / "latest.json").exists():
        assert latest(tmp_path)["step"] < bad_step


def test_early_stopping_restores_the_best_weights(tmp_path, run_job):
    # A min_delta no epoch can meet: the first epoch is the best and
    # patience epochs later the run stops.
    result, log = run_job(small_overrides(tmp_path, **{
        "train.epochs": 6, "train.early_stopping.enabled": "true", "train.early_stopping.patience": 2,
        "train.early_stopping.min_delta": 100}))
    assert "early stopping" in log
    rows = metrics(tmp_path)
    assert len(rows) == 3
    record = latest(tmp_path)
    assert record["best"]["step"] == rows[0]["step"] and record["stopped_early"]
    # The exported weights are the best checkpoint's, not the last epoch's.
    from job import model as models

    best = models.build("simple_cnn")
    tf.train.Checkpoint(model=best).read(str(tmp_path / "ckpt" / f"ckpt-{rows[0]['step']}" / "ckpt")).expect_partial()
    expected = tf.nn.softmax(best(OUTPUTS_PROBE, training=False)).numpy()
    np.testing.assert_allclose(outputs(result.model_uri), expected, atol=1e-6)


@pytest.mark.parametrize("extra", [
    {"model.name": "resnet"},
    {"model.name": "airbench", "model.width": 0.25, "train.optimizer": "sgd", "train.nesterov": "true"},
    {"train.optimizer": "adamw", "train.weight_decay": 0.01, "train.lr_schedule": "one_cycle"},
    {"train.optimizer": "sgd", "train.nesterov": "true", "train.label_smoothing": 0.1,
     "train.lr_schedule": "exponential"},
    {"train.mixed_precision": "true"},
    {"train.mixed_precision": "bfloat16", "model.tta": "flip_translate"},
    {"train.jit_compile": "true", "train.deterministic": "false", "train.steps_per_loop": 4},
    {"train.lr_schedule": "reduce_on_plateau", "data.validation_size": 100},
], ids=["resnet", "airbench", "adamw-onecycle", "sgd-nesterov-smoothing", "mixed-precision", "bfloat16-tta", "xla",
        "plateau"])
def test_every_recipe_switch_trains(tmp_path, run_job, extra):
    result, log = run_job(small_overrides(tmp_path, **{"train.max_steps": 8, **extra}))
    assert result.step == 8
    # This suite runs on CPU-only hosts, where float16 (not bfloat16) is slow enough to warn about.
    warned = "warning: train.mixed_precision is on but this host has no GPU" in log
    assert warned == (extra.get("train.mixed_precision") == "true")
    assert ("evaluating and exporting in float32" in log) == ("train.mixed_precision" in extra)
    probs = outputs(result.model_uri)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=1e-3)


def test_shipped_synthetic_config_reaches_90_percent_in_3_epochs(tmp_path):
    # The shipped file, through the real command line, as a user runs it.
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "job", "train", "--config", str(root / "configs" / "synthetic.yaml"),
           "--set", f"checkpoint.uri={tmp_path / 'ckpt'}", "--set", f"export.uri={tmp_path / 'export'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = latest(tmp_path)
    assert len(metrics(tmp_path)) == 3
    assert record["export"]["test_accuracy"] >= 0.9
    assert "resolved config:" in done.stdout and "exported model version 1" in done.stdout


def test_sigterm_commits_a_checkpoint_and_exits_75(tmp_path):
    cmd = [sys.executable, "-m", "job", "train", *sum((["--set", o] for o in small_overrides(
        tmp_path, **{"train.epochs": 50, "checkpoint.every_steps": 1000})), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1 done"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGTERM" in err and "Traceback" not in err
    record = latest(tmp_path)
    assert record["step"] >= 31 and (tmp_path / "ckpt" / f"ckpt-{record['step']}").is_dir()
    # The retried job carries on from that checkpoint.
    resumed = subprocess.run(cmd[:-2] + ["--set", "train.epochs=3"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {record['step']}" in resumed.stdout


def test_every_seconds_commits_at_each_compiled_call(tmp_path, run_job):
    # A time limit every compiled call overruns, and a step count never due:
    # every call ends in a commit (the epoch's end commits anyway).
    run_job(small_overrides(tmp_path, **{"train.epochs": 1, "train.steps_per_loop": 4, "checkpoint.every_steps": 1000,
                                         "checkpoint.every_seconds": "0.000001", "checkpoint.keep": 100}))
    assert latest(tmp_path)["kept"] == [*range(4, 31, 4), 31]
