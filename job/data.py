"""The input pipeline over the data job/sources.py loads.

Everything random here is a pure function of (seed, epoch, example index):
the order of an epoch, each example's crop and flip. That is what lets a run
stopped at any step and restarted see exactly the batches it would have seen.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from job.errors import ConfigError

PAD = 4


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def augment_params(seed: int, epoch: int, n: int, pad: int = PAD,
                   flip: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """Crop offsets and flips for every example of an epoch, indexed by example.
    `alternating` flips: a random half in epoch 0, then each image the other
    way round from the epoch before."""
    rng = np.random.default_rng([seed, epoch, 1])
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2)).astype(np.int32)
    if flip == "alternating":
        return offsets, (np.random.default_rng([seed, 0, 2]).random(n) < 0.5) ^ bool(epoch % 2)
    return offsets, rng.random(n) < 0.5


def crop_and_flip(images: tf.Tensor, offsets: tf.Tensor, flips: tf.Tensor, pad: int = PAD) -> tf.Tensor:
    """Pad-and-crop plus horizontal flip of a batch, as two gathers."""
    size = tf.shape(images)[1]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    rows = offsets[:, :1] + tf.range(size)[None, :]
    cols = offsets[:, 1:] + tf.range(size)[None, :]
    cols = tf.where(flips[:, None], tf.reverse(cols, axis=[1]), cols)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


class TrainStream:
    """The training batches of one run: epoch e, from step s on."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int, batch_size: int, augment: bool,
                 translate: int = PAD, flip: str = "random"):
        self.images = tf.constant(images)
        self.labels = tf.constant(labels)
        self.n = len(images)
        self.seed, self.batch_size, self.augment, self.translate, self.flip = seed, batch_size, augment, translate, flip
        # Dropping the ragged last batch keeps one traced step shape and a
        # fixed number of steps per epoch, which resume arithmetic relies on.
        self.steps_per_epoch = self.n // batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size: {batch_size} is larger than the {self.n} training examples")

    def epoch(self, epoch: int, start_step: int = 0, ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        """With an input context (tf.distribute calls this once per worker),
        the worker's share of each global batch: its replicas' slices, one
        per-replica batch after another, so all replicas together see exactly
        the batch one device would, each example with its own crop and flip."""
        b = batch = self.batch_size
        order = epoch_order(self.seed, epoch, self.n)[start_step * b : self.steps_per_epoch * b]
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            batch = ctx.get_per_replica_batch_size(b)
            local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
            first = ctx.input_pipeline_id * local
            order = order.reshape(-1, ctx.num_replicas_in_sync, batch)[:, first : first + local].ravel()
        images, labels = self.images, self.labels
        if self.augment:
            pad = self.translate
            offsets, flips = augment_params(self.seed, epoch, self.n, pad, self.flip)
            ds = tf.data.Dataset.from_tensor_slices((order, offsets[order], flips[order]))
            ds = ds.batch(batch, drop_remainder=True)
            ds = ds.map(lambda i, o, f: (crop_and_flip(tf.gather(images, i), o, f, pad), tf.gather(labels, i)))
        else:
            ds = tf.data.Dataset.from_tensor_slices(order).batch(batch, drop_remainder=True)
            ds = ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
        return _maybe_prefetch(ds)


def _maybe_prefetch(ds: tf.data.Dataset) -> tf.data.Dataset:
    # Prefetching overlaps input work with an accelerator's compute. On a
    # CPU-only host there is nothing to overlap with: its threads only take
    # cores from the training step (measured in docs/benchmarks.md). So is
    # tf.data's autotuning, with the prefetch it injects by itself: there,
    # an epoch's iterator took 10-45 s to delete in about one epoch in three
    # (docs/benchmarks.md, "Time to accuracy").
    if tf.config.list_physical_devices("GPU"):
        return ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> tf.data.Dataset:
    return _maybe_prefetch(tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size))
