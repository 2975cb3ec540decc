"""The input pipeline's randomness is a pure function of (seed, epoch, index)."""

import numpy as np

from job import data


def test_alternating_flips_show_every_image_both_ways_every_two_epochs():
    flips = [data.augment_params(3, epoch, 1000, pad=2, flip="alternating")[1] for epoch in range(4)]
    assert 400 < flips[0].sum() < 600
    for before, after in zip(flips, flips[1:], strict=False):
        np.testing.assert_array_equal(after, ~before)
    # Crops are still drawn afresh each epoch, and everything repeats for the same arguments.
    offsets = [data.augment_params(3, epoch, 1000, pad=2, flip="alternating")[0] for epoch in range(2)]
    assert not np.array_equal(offsets[0], offsets[1]) and offsets[0].max() == 4
    np.testing.assert_array_equal(data.augment_params(3, 2, 1000, 2, "alternating")[1], flips[2])


def test_random_flips_are_drawn_afresh_each_epoch():
    a, b = (data.augment_params(3, epoch, 1000)[1] for epoch in (0, 1))
    assert 350 < (a == b).sum() < 650
