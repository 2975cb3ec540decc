"""What a run trains, built from its config, the checkpoint that holds all of
it, and the compiled calls that step it, timed. The controller drives these;
the benches build and step them too, so that they measure what the job runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import tensorflow as tf

from job import data, model, optim, sources
from job.config import Config
from job.patience import Patience
from job.trainer import Trainer


def configure_determinism(cfg: Config) -> None:
    # The seed is not set here: whatever runs between here and the model
    # build (a download) may draw from global random state. model.build seeds.
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # Determinism is process-wide and TF has no public switch back; a
        # notebook or test that runs several jobs in one process needs it.
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


class Progress(tf.Module):
    """Everything besides weights and optimizer slots that a resume needs."""

    def __init__(self, early_stopping: Patience, plateau: Patience):
        super().__init__(name="progress")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
        # The monitors own their state; it is checkpointed here, under the
        # names it had before they did, so that older checkpoints restore.
        self.best, self.since_best = early_stopping.best, early_stopping.since_best
        self.plateau_best, self.plateau_wait = plateau.best, plateau.since_best
        self.stopped_early = tf.Variable(False, trainable=False)
        # Wall-clock seconds of training so far, over every attempt: time to
        # accuracy survives a resume (the work lost since the last commit is
        # not counted, as it is redone).
        self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False)


@dataclass
class Parts:
    """What a run trains, and the checkpoint that holds all of it."""

    stream: data.TrainStream
    model: keras.Model
    schedule: optim.Schedule
    optimizer: keras.optimizers.Optimizer
    trainer: Trainer
    # The monitored metric's best, which names the best checkpoint, and,
    # when train.early_stopping is enabled, the patience that stops the run.
    early_stopping: Patience
    progress: Progress
    checkpoint: tf.train.Checkpoint


def build(cfg: Config, splits: sources.Splits, strategy: tf.distribute.Strategy | None = None) -> Parts:
    """A run's parts as the job builds them."""
    stream = data.TrainStream(splits.x_train, splits.y_train, cfg.seed, cfg.train.batch_size, cfg.data.augment,
                              cfg.data.translate, cfg.data.flip)
    with (strategy or tf.distribute.get_strategy()).scope():
        # The whitening layer of airbench reads the first 5,000 training images.
        net = model.build(cfg.model.name, cfg.train.dtype_policy, cfg.model.width, splits.x_train[:5000],
                          seed=cfg.seed, tta=cfg.model.tta)
        schedule = optim.Schedule(cfg.train, stream.steps_per_epoch)
        optimizer = optim.build_optimizer(cfg.train, schedule)
        lookahead = (optim.Lookahead(cfg.train.lookahead, net, cfg.train.epochs * stream.steps_per_epoch)
                     if cfg.train.lookahead.enabled else None)
        trainer = Trainer(net, optimizer, cfg.train.batch_size, cfg.train.label_smoothing, cfg.train.jit_compile,
                          lookahead)
    stopping = cfg.train.early_stopping
    # While early stopping is off, val_loss still names the best checkpoint.
    early_stopping = (Patience(stopping.monitor, stopping.patience, stopping.min_delta) if stopping.enabled
                      else Patience("val_loss", None, stopping.min_delta))
    progress = Progress(early_stopping, schedule.plateau)
    checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer, trainer=trainer, progress=progress,
                                     lr_scale=schedule.scale)
    return Parts(stream, net, schedule, optimizer, trainer, early_stopping, progress, checkpoint)


@dataclass
class Chunk:
    """One compiled call: the steps it ran, where they ended, its last loss and its time."""

    steps: int
    step: int
    in_epoch: int
    ends_epoch: bool
    loss: float
    seconds: float


def chunks(cfg: Config, parts: Parts, epoch: int, in_epoch: int, target: int) -> Iterator[Chunk]:
    """The rest of `epoch` from its step `in_epoch` on, up to step `target`,
    in compiled calls of up to `train.steps_per_loop` steps, each timed and
    its loss read back."""
    steps_per_epoch = parts.stream.steps_per_epoch
    iterator = iter(parts.trainer.strategy.distribute_datasets_from_function(
        lambda ctx, epoch=epoch, in_epoch=in_epoch: parts.stream.epoch(epoch, in_epoch, ctx)))
    step = epoch * steps_per_epoch + in_epoch
    while in_epoch < steps_per_epoch and step < target:
        # Chunks end on checkpoint boundaries so checkpoints land on
        # the same steps however steps_per_loop is set.
        n = min(cfg.train.steps_per_loop, steps_per_epoch - in_epoch, target - step,
                cfg.checkpoint.every_steps - step % cfg.checkpoint.every_steps)
        started = time.perf_counter()
        loss = float(parts.trainer.train_loop(iterator, tf.constant(n)))
        seconds = time.perf_counter() - started
        step, in_epoch = step + n, in_epoch + n
        yield Chunk(n, step, in_epoch, in_epoch == steps_per_epoch, loss, seconds)


class Throughput:
    """Images per second of an epoch's compiled calls. The run's first call
    traces and compiles; counting it would report the compiler's speed
    rather than training's, unless it is all an epoch has."""

    def __init__(self, batch_size: int, say):
        self.batch_size, self.say = batch_size, say
        self.first_call: tuple[int, float] | None = None
        self.images, self.seconds = 0, 0.0

    def start_epoch(self) -> None:
        self.images, self.seconds = 0, 0.0

    def add(self, chunk: Chunk) -> None:
        if self.first_call is None:
            self.first_call = (chunk.steps * self.batch_size, chunk.seconds)
            self.say(f"compiled the training step in {chunk.seconds:.1f}s")
        else:
            self.images += chunk.steps * self.batch_size
            self.seconds += chunk.seconds

    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def epoch(self) -> tuple[int, float]:
        """The epoch's (images, seconds)."""
        if self.images == 0 and self.first_call is not None:
            return self.first_call
        return self.images, self.seconds
