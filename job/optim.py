"""Optimizers and learning-rate schedules, built from `train.*`.

Every schedule is a function of the optimizer's step alone, times a scale
that only reduce-on-plateau changes; both live in the checkpoint, so a
resumed run follows the same curve. The horizon is `train.epochs`, never
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


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, cfg: Train, steps_per_epoch: int):
        self.cfg = cfg
        self.base = cfg.learning_rate
        self.spe = float(steps_per_epoch)
        self.total = float(cfg.epochs * steps_per_epoch)
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        s = self.cfg.lr_schedule
        lr = self.base
        if s.name == "exponential":
            lr = self.base * tf.pow(s.decay_rate, step / (s.decay_epochs * self.spe))
        elif s.name == "cosine":
            warmup = s.warmup_epochs * self.spe
            progress = tf.clip_by_value((step - warmup) / max(self.total - warmup, 1.0), 0.0, 1.0)
            cosine = s.final_fraction + (1 - s.final_fraction) * 0.5 * (1 + tf.cos(math.pi * progress))
            ramp = tf.minimum((step + 1) / max(warmup, 1.0), 1.0) if warmup > 0 else 1.0
            lr = self.base * cosine * ramp
        elif s.name == "one_cycle":
            peak = s.peak_at * self.total
            rising = s.start_fraction + (1 - s.start_fraction) * step / peak
            falling = 1 - (1 - s.final_fraction) * (step - peak) / max(self.total - peak, 1.0)
            lr = self.base * tf.clip_by_value(tf.where(step < peak, rising, falling), 0.0, 1.0)
        return lr * self.scale

    def get_config(self):
        return {"cfg": self.cfg.model_dump(), "steps_per_epoch": self.spe}


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
