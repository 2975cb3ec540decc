"""Micro-batching: coalescing, its limits, load shedding, errors."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve.batching import Batcher, Overloaded


class Model:
    """Doubles its input; records the batch sizes it was called with."""

    def __init__(self, delay=0.0, fail=False):
        self.sizes, self.delay, self.fail = [], delay, fail

    def __call__(self, x):
        self.sizes.append(len(x))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model broke")
        return x * 2, "v1"


def test_concurrent_requests_share_one_call_and_each_gets_its_own_rows():
    model = Model(delay=0.01)
    batcher = Batcher(model, max_batch_size=8, batch_timeout_ms=50, max_queue=64)
    inputs = [np.full((1, 2), i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: batcher.predict(x, timeout=5), inputs))
    for x, (y, info) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(y, x * 2)
        assert info == "v1"
    assert sum(model.sizes) == 8 and max(model.sizes) > 1 and max(model.sizes) <= 8


def test_a_request_that_would_overflow_the_batch_starts_the_next():
    model = Model(delay=0.05)
    batcher = Batcher(model, max_batch_size=4, batch_timeout_ms=100, max_queue=64)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.predict, np.ones((3, 1)), 5) for _ in range(3)]
        for f in futures:
            assert f.result()[0].shape == (3, 1)
    assert model.sizes == [3, 3, 3]


def test_batching_is_off_at_size_one():
    model = Model(delay=0.05)
    batcher = Batcher(model, max_batch_size=1, batch_timeout_ms=50, max_queue=1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: batcher.predict(np.ones((1, 1)), timeout=5), range(4)))
    assert all(y[0, 0] == 2 for y, _ in results) and model.sizes == [1, 1, 1, 1]


def test_a_full_queue_sheds_load_at_once():
    model = Model(delay=0.5)
    batcher = Batcher(model, max_batch_size=2, batch_timeout_ms=0, max_queue=1)
    pool = ThreadPoolExecutor(4)
    pool.submit(batcher.predict, np.ones((1, 1)), 5)  # taken by the batcher, running
    time.sleep(0.1)
    pool.submit(batcher.predict, np.ones((1, 1)), 5)  # waits in the queue
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        batcher.predict(np.ones((1, 1)), timeout=5)
    assert time.monotonic() - started < 0.1
    pool.shutdown(wait=True)


def test_a_model_error_reaches_every_request_in_the_batch():
    batcher = Batcher(Model(delay=0.01, fail=True), max_batch_size=4, batch_timeout_ms=30, max_queue=8)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.predict, np.ones((1, 1)), 5) for _ in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="model broke"):
                f.result()
