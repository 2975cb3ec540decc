"""What a run starts from: its own checkpoint, a chosen one (checkpoint.resume_from), another
run's weights (model.init_from); what a resume refuses; which weights are exported."""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import small_overrides
from job.config import load_config
from job.evaluate import evaluate
from test_train import PROBE, latest, outputs

STEPS_PER_EPOCH = (1200 - 200) // 32  # small_overrides' split and batch


def probabilities_at(ckpt_dir) -> np.ndarray:
    from job import model as models

    net = models.build("simple_cnn")
    tf.train.Checkpoint(model=net).read(str(ckpt_dir / "ckpt")).expect_partial()
    return tf.nn.softmax(net(PROBE, training=False)).numpy()



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
