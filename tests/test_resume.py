"""What a run starts from: its own checkpoint, a chosen one (checkpoint.resume_from), another
run's weights (model.init_from); what a resume refuses; which weights are exported."""

import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import OUTPUTS_PROBE, latest, outputs, small_overrides
from job.config import load_config
from job.errors import ConfigError
from job.evaluate import evaluate

pytestmark = pytest.mark.slow  # every test here trains end to end, or builds a run's parts

STEPS_PER_EPOCH = (1200 - 200) // 32  # small_overrides' split and batch


def probabilities_at(ckpt_dir) -> np.ndarray:
    from job import model as models

    net = models.build("simple_cnn")
    tf.train.Checkpoint(model=net).read(str(ckpt_dir / "ckpt")).expect_partial()
    return tf.nn.softmax(net(OUTPUTS_PROBE, training=False)).numpy()


@pytest.mark.parametrize("schedule", ["cosine", "one_cycle"])
def test_epochs_are_fixed_for_a_run_whose_schedule_spans_them(tmp_path, run_job, schedule):
    run_job(small_overrides(tmp_path, **{"train.lr_schedule": schedule, "train.max_steps": 3}))
    for epochs in (3, 1):
        with pytest.raises(ConfigError, match=rf"train\.epochs: 2 -> {epochs}.*train\.max_steps.*model\.init_from"):
            run_job(small_overrides(tmp_path, **{"train.lr_schedule": schedule, "train.epochs": epochs}))
    result, log = run_job(small_overrides(tmp_path, **{"train.lr_schedule": schedule, "train.max_steps": 6}))
    assert "resumed from step 3" in log and result.step == 6


def test_epochs_stay_a_stop_condition_for_a_schedule_without_a_horizon(tmp_path, run_job):
    run_job(small_overrides(tmp_path, **{"train.lr_schedule": "exponential", "train.epochs": 1}))
    result, log = run_job(small_overrides(tmp_path, **{"train.lr_schedule": "exponential"}))
    assert f"resumed from step {STEPS_PER_EPOCH}" in log and result.step == 2 * STEPS_PER_EPOCH


def test_restarting_from_another_runs_checkpoint_ends_where_that_run_ended(tmp_path, run_job):
    # The schedule and the augmentation both depend on the restored step.
    common = {"train.lr_schedule": "cosine", "data.augment": "true"}
    a, _ = run_job(small_overrides(tmp_path / "a", **common))
    step = latest(tmp_path / "a")["kept"][0]
    assert STEPS_PER_EPOCH < step < a.step
    source = tmp_path / "a" / "ckpt" / f"ckpt-{step}"
    b_config = small_overrides(tmp_path / "b", **common, **{"checkpoint.resume_from": source})
    b, log = run_job(b_config)
    assert f"resumed from step {step} ({source}, checkpoint.resume_from)" in log
    assert b.step == a.step
    np.testing.assert_array_equal(outputs(b.model_uri), outputs(a.model_uri))
    # B holds the starting point itself, so it needs nothing of A's from now on.
    assert step in latest(tmp_path / "b")["kept"] and (tmp_path / "b" / "ckpt" / f"ckpt-{step}").is_dir()
    # Retried with the same config, B carries on from its own state instead of going back.
    again, log = run_job(b_config)
    assert "nothing to do" in log and again.version == b.version


def test_restarting_from_an_earlier_kept_step_of_the_run_itself(tmp_path, run_job):
    first, _ = run_job(small_overrides(tmp_path))
    record = latest(tmp_path)
    kept = sorted({*record["kept"], record["best"]["step"]})
    with pytest.raises(ConfigError, match=rf"checkpoint\.resume_from: step 7 .*\(kept: {', '.join(map(str, kept))}\)"):
        run_job(small_overrides(tmp_path, **{"checkpoint.resume_from": 7}))
    step = record["kept"][0]
    again, log = run_job(small_overrides(tmp_path, **{"checkpoint.resume_from": step}))
    assert f"resumed from step {step}" in log and again.version == 2
    np.testing.assert_array_equal(outputs(again.model_uri), outputs(first.model_uri))


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, run_job):
    run_job(small_overrides(tmp_path / "a", **{"train.epochs": 1}))
    source = tmp_path / "a" / "ckpt"
    # A learning rate too small to move the weights: what B exports is what it started from.
    warm = {"model.init_from": source, "train.learning_rate": 1e-12, "train.max_steps": 1}
    b, log = run_job(small_overrides(tmp_path / "b", **warm))
    assert f"initialised weights from {source / f'ckpt-{STEPS_PER_EPOCH}'}" in log and "resumed" not in log
    assert b.step == 1 and latest(tmp_path / "b")["step"] == 1
    np.testing.assert_allclose(outputs(b.model_uri), probabilities_at(source / f"ckpt-{STEPS_PER_EPOCH}"), atol=1e-5)
    # A retried run resumes its own checkpoint; the warm start was for its beginning.
    again, log = run_job(small_overrides(tmp_path / "b", **{**warm, "train.max_steps": 2}))
    assert "resumed from step 1" in log and "initialised" not in log and again.step == 2
    with pytest.raises(ConfigError, match=r"model\.init_from.*model\.width"):
        run_job(small_overrides(tmp_path / "c", **{"model.init_from": source, "model.width": 0.5}))


def test_export_weights_best_exports_the_best_checkpoint(tmp_path, run_job):
    # A min_delta no later epoch can meet: the first validation stays the best.
    overrides = small_overrides(tmp_path, **{"export.weights": "best", "train.early_stopping.min_delta": 100})
    result, log = run_job(overrides)
    assert latest(tmp_path)["best"]["step"] == STEPS_PER_EPOCH and result.step == 2 * STEPS_PER_EPOCH
    assert f"export.weights=best: restoring the best weights, from step {STEPS_PER_EPOCH}" in log
    card = json.loads((tmp_path / "export/cifar10/1/assets.extra/model_card.json").read_text())
    assert card["weights_step"] == STEPS_PER_EPOCH and card["step"] == result.step
    exported = outputs(result.model_uri)
    np.testing.assert_allclose(exported, probabilities_at(tmp_path / "ckpt" / f"ckpt-{STEPS_PER_EPOCH}"), atol=1e-6)
    assert not np.allclose(exported, probabilities_at(tmp_path / "ckpt" / f"ckpt-{result.step}"), atol=1e-3)
    # The card's test accuracy is the exported model's (the serving graph may break a tie differently).
    tested = evaluate(result.model_uri, load_config(None, overrides))
    assert tested["accuracy"] == pytest.approx(card["test_accuracy"], abs=1 / tested["examples"])


# What a checkpoint of simple_cnn trained by Adam holds, by key path, as the
# job wrote it before and after the monitors came to own their counts. A key
# that moves is state older checkpoints cannot restore: a change that moves
# one bumps model.REVISIONS too, so that such checkpoints are refused by name.
CHECKPOINT_KEYS = {
    "lr_scale", "trainer/sums", "optimizer/_iterations",
    "progress/step", "progress/epochs_done", "progress/stopped_early", "progress/elapsed",
    "progress/best", "progress/since_best", "progress/plateau_best", "progress/plateau_wait",
    *(f"optimizer/_trainable_variables/{i}" for i in range(10)),  # the network's weights
    *(f"optimizer/_variables/{i}" for i in range(1, 21)),  # Adam's two slots for each
}


@pytest.mark.parametrize("extra", [{}, {"train.lr_schedule": "reduce_on_plateau",
                                        "train.early_stopping.enabled": "true"}], ids=["default", "monitors-on"])
def test_checkpoint_keys_stay_where_older_checkpoints_hold_them(tmp_path, extra):
    from job import parts, sources

    cfg = load_config(None, small_overrides(tmp_path, **extra))
    run = parts.build(cfg, sources.load(cfg))
    run.early_stopping.update(0.5)
    run.early_stopping.update(0.7)
    run.schedule.plateau.update(0.25)
    run.schedule.scale.assign(0.125)
    path = run.checkpoint.write(str(tmp_path / "ckpt"))
    stored = {name.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE") for name, _ in tf.train.list_variables(path)}
    assert stored - {"_CHECKPOINTABLE_OBJECT_GRAPH"} == CHECKPOINT_KEYS
    # Each monitor's count is at the key its state had before the monitor owned it.
    value = tf.train.load_checkpoint(path).get_tensor
    assert value("progress/best/.ATTRIBUTES/VARIABLE_VALUE") == 0.5
    assert value("progress/since_best/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert value("progress/plateau_best/.ATTRIBUTES/VARIABLE_VALUE") == 0.25
    assert value("progress/plateau_wait/.ATTRIBUTES/VARIABLE_VALUE") == 0
    assert value("lr_scale/.ATTRIBUTES/VARIABLE_VALUE") == 0.125

