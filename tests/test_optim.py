"""Lookahead: what the slow weights hold after each step; reduce-on-plateau:
when the schedule lowers its rate; Patience, which it and early stopping wait with."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from job import optim
from job.config import Lookahead, load_config
from job.patience import Patience


def test_lookahead_pulls_the_slow_weights_every_k_steps_and_resets_the_network_to_them():
    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros"),
                            keras.layers.BatchNormalization()])
    la = optim.Lookahead(Lookahead(enabled=True, every_steps=2, decay=0.9), net, total_steps=10)
    kernel = net.layers[0].kernel
    # BatchNorm's statistics are averaged too, not only what the optimizer trains.
    assert any("moving_mean" in v.path for v in la.fast)

    kernel.assign(np.ones((2, 1), np.float32))
    la.after_step(tf.constant(1, tf.int64))  # between updates: nothing moves
    np.testing.assert_array_equal(kernel.numpy(), 1.0)
    la.after_step(tf.constant(4, tf.int64))
    keep = 0.9 ** 2 * (4 / 10) ** 3
    np.testing.assert_allclose(kernel.numpy(), 1 - keep, rtol=1e-6)  # slow was 0, the network 1

    kernel.assign(np.full((2, 1), 5.0, np.float32))
    la.after_step(tf.constant(10, tf.int64))  # the last step: the run ends on the slow weights
    keep = 0.9 ** 2
    np.testing.assert_allclose(kernel.numpy(), keep * (1 - 0.9 ** 2 * 0.4 ** 3) + (1 - keep) * 5, rtol=1e-6)
    np.testing.assert_array_equal(la.slow[la.fast.index(kernel)].numpy(), kernel.numpy())


def schedule(*sets: str) -> optim.Schedule:
    """A schedule as the job builds it, at a base learning rate of 0.1."""
    return optim.Schedule(load_config(None, ["train.learning_rate=0.1", *sets]).train, steps_per_epoch=10)


def test_reduce_on_plateau_multiplies_the_rate_after_patience_epochs_without_improving_down_to_min_lr():
    plateau = schedule("train.lr_schedule=reduce_on_plateau", "train.lr_schedule.patience=1",
                       "train.lr_schedule.factor=0.5", "train.lr_schedule.min_lr=0.02")
    # val_loss (the default monitor): the first value is the best so far; one
    # epoch without improving is tolerated, the next reduces and the wait restarts.
    assert [plateau.after_validation(loss, 0.0) for loss in (1.0, 1.0, 1.0)] == [None, None, 0.05]
    assert float(plateau(tf.constant(5))) == pytest.approx(0.05)
    assert [plateau.after_validation(loss, 0.0) for loss in (0.9, 0.95, 0.95)] == [None, None, pytest.approx(0.025)]
    assert plateau.after_validation(0.95, 0.0) is None
    assert plateau.after_validation(0.95, 0.0) == pytest.approx(0.02)  # 0.0125 is below min_lr
    assert float(plateau.scale.numpy()) == pytest.approx(0.2)


def test_reduce_on_plateau_watching_accuracy_waits_while_accuracy_rises():
    plateau = schedule("train.lr_schedule=reduce_on_plateau", "train.lr_schedule.patience=0",
                       "train.lr_schedule.monitor=val_accuracy")
    assert [plateau.after_validation(9.0, accuracy) for accuracy in (0.5, 0.6, 0.7)] == [None, None, None]
    assert plateau.after_validation(0.1, 0.6) == pytest.approx(0.05)  # the loss fell; accuracy is what counts


def test_other_schedules_never_change_their_scale():
    cosine = schedule("train.lr_schedule=cosine")
    assert all(cosine.after_validation(loss, 0.0) is None for loss in (1.0, 2.0, 3.0, 4.0))
    assert float(cosine.scale.numpy()) == 1.0


# --- Patience: the best value and the epochs since, for early stopping and the plateau ---

def test_patience_runs_out_after_that_many_epochs_without_improving_and_an_improvement_restarts_it():
    wait = Patience("val_loss", 2)
    assert wait.update(1.0) is False and float(wait.best.numpy()) == 1.0
    assert wait.improved(0.9) and not wait.improved(1.0)
    assert wait.update(1.0) is False and int(wait.since_best.numpy()) == 1
    assert wait.update(1.1) is True
    assert wait.update(0.5) is False and float(wait.best.numpy()) == 0.5 and int(wait.since_best.numpy()) == 0


def test_patience_for_accuracy_counts_only_rises_larger_than_min_delta():
    wait = Patience("val_accuracy", 1, min_delta=0.1)
    wait.update(0.5)
    assert not wait.improved(0.55) and not wait.improved(0.4) and wait.improved(0.61)
    assert wait.update(0.55) is True and float(wait.best.numpy()) == 0.5


def test_patience_without_a_limit_never_runs_out_and_restart_keeps_the_best():
    wait = Patience("val_loss", None)
    assert not any(wait.update(1.0 + i) for i in range(10))
    wait.restart()
    assert int(wait.since_best.numpy()) == 0 and float(wait.best.numpy()) == 1.0
