"""`cifar-job evaluate`: score an exported model, as TF Serving would run it,
on the config's test split."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from common import layout
from job import data, sources, storage
from job.config import Config
from job.errors import JobError


def resolve_version(model_uri: str) -> str:
    """A version directory as given, or the highest published version under a model base."""
    backend = storage.backend(model_uri)
    versions = [int(n) for n in backend.published(model_uri) if n.isdigit()]
    return storage.join(model_uri, str(max(versions))) if versions else model_uri


def evaluate(model_uri: str, cfg: Config) -> dict:
    version_uri = resolve_version(model_uri)
    local = storage.backend(version_uri).local_copy(version_uri)
    try:
        serve = tf.saved_model.load(str(local)).signatures[layout.SIGNATURE]
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"{version_uri} is not a SavedModel with a {layout.SIGNATURE!r} signature: {exc}") from None
    splits = sources.load(cfg)
    total, correct = 0.0, 0
    for images, labels in data.eval_batches(splits.x_test, splits.y_test):
        probs = serve(**{layout.INPUT: images})[layout.PROBABILITIES].numpy()
        picked = probs[np.arange(len(probs)), labels.numpy()]
        total += float(-np.log(np.maximum(picked, 1e-12)).sum())
        correct += int((probs.argmax(axis=1) == labels.numpy()).sum())
    n = len(splits.y_test)
    return {"accuracy": correct / n, "loss": total / n, "examples": n}
