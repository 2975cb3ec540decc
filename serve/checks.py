"""The checks a new version passes before it is served (in process) or
mirrored for TF Serving (`cifar-serve sync`): its answers on the probe batch
the job recorded in `assets.extra/`, and the test accuracy on its model card.

The probe record is the job's `probe_images.npy` (uint8 [N,32,32,3]) and
`probe_outputs.npz` (one array per `serving_default` output), read here
without importing the job.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from common import layout
from serve import store

# The record is the same SavedModel graph's own output, so what remains is
# another machine's kernels (CPU vs GPU, oneDNN's AVX-512 vs AMX): float32
# probabilities stay well within this (job/export.py measured 3.4e-5 even
# between float16 eager and graph runs). A wrong model, wrong weights or
# wrong preprocessing moves them by far more than 1e-4.
PROBE_ATOL = 1e-4


class Refused(store.VersionError):
    """A version that must not be served; `reason` labels the refusal metric."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def loadable():
    """Whatever loading a version raises (TensorFlow on files it may not read or
    that are no SavedModel) as a store.VersionError: the version's own fault,
    refused until its files change, not the store's, tried again at the next poll."""
    try:
        yield
    except store.VersionError:
        raise
    except Exception as exc:
        raise store.VersionError(f"cannot be loaded: {store.describe(exc)}") from exc


def load(path: Path):
    """The version at `path`: its saved_model.pb as a SavedModel proto, and its signatures loaded."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    # Read first: TensorFlow reports a saved_model.pb it may not read as one that does not exist.
    saved = saved_model_pb2.SavedModel.FromString((Path(path) / "saved_model.pb").read_bytes())
    return saved, tf.saved_model.load(str(path)).signatures


def check(path: Path, signature, min_accuracy: float | None = None) -> bool:
    """Raise Refused if the version at `path` (its `serving_default`
    `signature` loaded) fails a check; return False if it has no probe record
    to check (exported before the job wrote one), True if it passed."""
    path = Path(path)
    if min_accuracy is not None:
        accuracy = _card_accuracy(path / layout.CARD)
        if accuracy is None or not accuracy >= min_accuracy:
            raise Refused(f"its model card's test_accuracy is {accuracy}, below SERVE_MIN_ACCURACY="
                          f"{min_accuracy:g}", "accuracy")
    if not (path / layout.PROBE_IMAGES).is_file():
        return False
    import tensorflow as tf

    images = np.load(path / layout.PROBE_IMAGES, allow_pickle=False)
    with np.load(path / layout.PROBE_OUTPUTS, allow_pickle=False) as record:
        expected = dict(record)
    got = signature(**{layout.INPUT: tf.constant(images, tf.uint8)})
    for name in sorted(set(expected) | set(got)):
        if name not in got or name not in expected:
            raise Refused(f"output {name!r} is in only one of the probe record and the signature", "probe")
        value = got[name].numpy()
        if value.dtype == object:  # strings come back as bytes; the record holds unicode
            value = np.char.decode(value.astype(bytes), "utf-8")
        want = expected[name]
        if value.shape != want.shape:
            raise Refused(f"output {name!r} has shape {value.shape} on the probe batch; "
                          f"the record says {want.shape}", "probe")
        if want.dtype.kind in "US":
            differ = int((value != want).sum())
            if differ:
                raise Refused(f"output {name!r} differs from the probe record on {differ} of "
                              f"{len(images)} images", "probe")
        else:
            gap = float(np.abs(value.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
            if not gap <= PROBE_ATOL:
                raise Refused(f"output {name!r} differs from the probe record by up to {gap:.3g} "
                              f"(allowed {PROBE_ATOL:g})", "probe")
    return True


def _card_accuracy(card: Path) -> float | None:
    try:
        value = json.loads(card.read_text())["test_accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
