"""Optimizers and learning-rate schedules, built from `train.*`.

Every schedule is a function of the optimizer's step alone, times a scale
that only reduce-on-plateau changes, from the validation metrics the
schedule is shown after each epoch (`Schedule.after_validation`); the step,
the scale and the plateau's patience live in the checkpoint, so a resumed
run follows the same curve. The horizon is `train.epochs`, never
`train.max_steps`: stopping early must not bend the curve. For the schedules
that have one (config.HORIZON_SCHEDULES) it is in the run's fingerprint, so a
resume cannot change it either.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from job.config import Lookahead as LookaheadConfig
from job.config import Train
from job.patience import Patience


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, cfg: Train, steps_per_epoch: int):
        self.cfg = cfg
        self.base = cfg.learning_rate
        self.steps_per_epoch = float(steps_per_epoch)
        self.total = float(cfg.epochs * steps_per_epoch)
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")
        curve = cfg.lr_schedule
        # Every schedule has the plateau's variables, so that every run's
        # checkpoint has the same keys; only reduce_on_plateau's ever change.
        self.plateau = (Patience(curve.monitor, curve.patience + 1) if curve.name == "reduce_on_plateau"
                        else Patience("val_loss", None))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        curve = self.cfg.lr_schedule
        lr = self.base
        if curve.name == "exponential":
            lr = self.base * tf.pow(curve.decay_rate, step / (curve.decay_epochs * self.steps_per_epoch))
        elif curve.name == "cosine":
            warmup = curve.warmup_epochs * self.steps_per_epoch
            progress = tf.clip_by_value((step - warmup) / max(self.total - warmup, 1.0), 0.0, 1.0)
            cosine = curve.final_fraction + (1 - curve.final_fraction) * 0.5 * (1 + tf.cos(math.pi * progress))
            ramp = tf.minimum((step + 1) / max(warmup, 1.0), 1.0) if warmup > 0 else 1.0
            lr = self.base * cosine * ramp
        elif curve.name == "one_cycle":
            peak = curve.peak_at * self.total
            rising = curve.start_fraction + (1 - curve.start_fraction) * step / peak
            falling = 1 - (1 - curve.final_fraction) * (step - peak) / max(self.total - peak, 1.0)
            lr = self.base * tf.clip_by_value(tf.where(step < peak, rising, falling), 0.0, 1.0)
        return lr * self.scale

    def after_validation(self, val_loss: float, val_accuracy: float) -> float | None:
        """Reduce-on-plateau's epoch: the new learning rate where the
        monitored metric has gone more than `patience` epochs without
        improving, else None."""
        curve = self.cfg.lr_schedule
        if curve.name != "reduce_on_plateau":
            return None
        if not self.plateau.update(val_loss if curve.monitor == "val_loss" else val_accuracy):
            return None
        self.plateau.restart()
        floor = curve.min_lr / self.base
        self.scale.assign(max(float(self.scale.numpy()) * curve.factor, floor))
        return self.base * float(self.scale.numpy())

    def get_config(self):
        return {"cfg": self.cfg.model_dump(), "steps_per_epoch": self.steps_per_epoch}


def build_optimizer(cfg: Train, schedule: Schedule) -> keras.optimizers.Optimizer:
    wd = cfg.weight_decay or None
    if cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(schedule, weight_decay=wd)
    elif cfg.optimizer == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    else:
        opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    if cfg.dtype_policy == "mixed_float16":
        # bfloat16 has float32's range: its gradients need no scaling.
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


class Lookahead(tf.Module):
    """airbench's weight averaging: slow weights that every `every_steps`
    steps take a step towards the network's, after which the network starts
    again from them. How much the slow weights keep rises as the cube of the
    run's progress, from nothing to `decay ** every_steps` at its last step,
    which ends the run on them. BatchNorm's statistics are averaged with the
    weights, as airbench averages its whole state. A function of the
    optimizer's step alone, and its variables are checkpointed, so a resumed
    run averages exactly as an uninterrupted one."""

    def __init__(self, cfg: LookaheadConfig, model: keras.Model, total_steps: int):
        """Build it inside the strategy's scope, as its variables must be."""
        super().__init__(name="lookahead")
        self.every, self.total = cfg.every_steps, total_steps
        self.final = cfg.decay ** cfg.every_steps
        self.fast = [v for v in model.variables if "float" in str(v.dtype)]
        self.slow = [tf.Variable(v.value, trainable=False, name="slow") for v in self.fast]

    def after_step(self, step) -> None:
        """Called with the optimizer's step count once each step is applied."""
        if step % self.every == 0 or step == self.total:
            progress = tf.minimum(tf.cast(step, tf.float32) / self.total, 1.0)
            keep = self.final * progress ** 3
            for fast, slow in zip(self.fast, self.slow, strict=True):
                slow.assign(keep * slow + (1 - keep) * fast.value)
                fast.assign(slow)
