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
    if cfg.mixed_precision:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt
