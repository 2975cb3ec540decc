"""Patience with a validation metric: its best value so far and the epochs
since, which early stopping and reduce-on-plateau both wait on.

The two numbers are variables so that a checkpoint carries them: a resumed
run keeps counting where the interrupted one stopped.
"""

from __future__ import annotations

import math

import tensorflow as tf


class Patience:
    def __init__(self, monitor: str, patience: int | None, min_delta: float = 0.0):
        """`monitor` is val_loss (lower is better) or val_accuracy; `patience`
        the epochs in a row without improving that run it out (None: never);
        a change smaller than `min_delta` is no improvement."""
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.since_best = tf.Variable(0, dtype=tf.int64, trainable=False)

    def improved(self, value: float) -> bool:
        """Whether `value` beats the best so far (the first value always does)."""
        best = float(self.best.numpy())
        if math.isnan(best):
            return True
        if self.monitor == "val_loss":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def update(self, value: float) -> bool:
        """Count an epoch's `value`; True when patience has run out."""
        if self.improved(value):
            self.best.assign(value)
            self.since_best.assign(0)
            return False
        self.since_best.assign_add(1)
        return self.patience is not None and int(self.since_best.numpy()) >= self.patience

    def restart(self) -> None:
        """Wait the whole patience again from here, keeping the best."""
        self.since_best.assign(0)
