"""Lookahead: what the slow weights hold after each step."""

import keras
import numpy as np
import tensorflow as tf

from job import optim
from job.config import Lookahead


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
