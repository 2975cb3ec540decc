"""The Predictor, without Flask: pixels and encoded images take the same path
(limit, batching, version metric), never sharing a model call."""

import concurrent.futures

import numpy as np
import pytest

from common.images import BadInput
from serve import metrics
from serve.backends import Loaded
from serve.predictor import Predictor
from serve.settings import Settings


class Recording:
    """A backend that records each model call's size and answers version 7."""

    def __init__(self):
        self.calls = []

    def _answer(self, kind, count):
        self.calls.append((kind, count))
        return {"probabilities": np.zeros((count, 10), np.float32),
                "label": np.array([b"cat"] * count, dtype=object)}, Loaded(7, None, ())

    def predict(self, images):
        return self._answer("pixels", len(images))

    def predict_bytes(self, encoded):
        assert all(type(e) is bytes for e in encoded)
        return self._answer("encoded", len(encoded))

    def status(self):
        return Loaded(7, None, ())


def predictor(**settings):
    backend = Recording()
    return Predictor(Settings(model_uri="/nowhere/cifar10", **settings), backend), backend


def test_encoded_images_are_batched_apart_from_pixels_and_set_the_version_metric():
    p, backend = predictor(max_batch_size=8, batch_timeout_ms=200)
    metrics.MODEL_VERSION.set(0)
    requests = [[b"\x89PNG\x00"] * 2, [b"\xff\xd8\x00"] * 3, np.zeros((2, 32, 32, 3), np.uint8)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(p.predict, requests))
    assert sorted(backend.calls) == [("encoded", 5), ("pixels", 2)]
    assert [len(outputs["probabilities"]) for outputs, _ in answers] == [2, 3, 2]
    outputs, loaded = answers[0]
    assert list(outputs) == ["label", "probabilities"] and outputs["label"].tolist() == ["cat", "cat"]
    assert loaded.version == 7 and metrics.MODEL_VERSION._value.get() == 7


@pytest.mark.parametrize("images", [[b"x"] * 3, np.zeros((3, 32, 32, 3), np.uint8)])
def test_the_limit_on_images_is_the_same_for_both_kinds(images):
    p, backend = predictor(max_instances=2)
    with pytest.raises(BadInput, match="3 images in one request; at most 2"):
        p.predict(images)
    assert backend.calls == []
