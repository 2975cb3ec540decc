"""What a run trains and is tested on: the data set `data.*` names, in
memory, with its validation split held out and its checksum.

Three sources: `synthetic` (built in), `cifar10` (job/cifar10.py) and
`folder` (job/image_folder.py); anything on S3 is first brought to a local
cache by job/storage.py. No TensorFlow here, so `cifar-job fetch-data` and
the demo get the data without TensorFlow's start-up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import layout
from job import cifar10, image_folder, storage
from job.config import Config
from job.errors import ConfigError

CLASS_NAMES = layout.CIFAR10_CLASSES
# The synthetic classes are fixed, whatever the run's seed, so that every run
# and every test sees the same problem.
_SYNTHETIC_SEED = 20_240_601


@dataclass(frozen=True)
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    checksum: str
    class_names: tuple[str, ...]  # label i is class_names[i]


def synthetic(train_size: int, test_size: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """CIFAR-shaped data a small CNN learns in a few epochs (measured in docs/benchmarks.md).

    Each class is a blocky colour pattern; an example is its class's pattern,
    shifted by a few pixels, blended with a random pattern of the same kind
    and per-pixel noise, so no single pixel or colour gives the class away.
    """
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    blocks = rng.uniform(0, 255, size=(len(CLASS_NAMES), 4, 4, 3))
    templates = blocks.repeat(8, axis=1).repeat(8, axis=2)

    def draw(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([_SYNTHETIC_SEED, stream])
        labels = r.integers(0, len(CLASS_NAMES), size=n)
        shifts = r.integers(-3, 4, size=(n, 2))
        distractors = r.uniform(0, 255, size=(n, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
        noise = r.normal(0, 40, size=(n, 32, 32, 3))
        signal = np.stack([np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts, strict=True)])
        images = 0.5 * signal + 0.5 * distractors + noise
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32)

    return draw(train_size, 1), draw(test_size, 2)


def load(cfg: Config, local: Path | None = None) -> Splits:
    """The data set, split. `local` is what local_copy(cfg) returned, when the caller already has it."""
    if cfg.data.source == "synthetic":
        (x, y), (x_test, y_test) = synthetic(cfg.data.synthetic.train_size, cfg.data.synthetic.test_size)
        class_names = CLASS_NAMES
    else:
        local = local or local_copy(cfg)
        if cfg.data.source == "folder":
            (x, y), (x_test, y_test), class_names = image_folder.load_image_folder(local, shown_as=cfg.data.uri)
        else:
            (x, y), (x_test, y_test) = cifar10.read(local, shown_as=cfg.data.uri)
            class_names = CLASS_NAMES
    n_val = cfg.data.validation_size
    order = np.random.default_rng([cfg.seed, 0x5A11]).permutation(len(x))
    train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    return Splits(x[train], y[train], x[val], y[val], x_test, y_test, checksum(x, y, x_test, y_test), class_names)


def local_copy(cfg: Config) -> Path:
    """Where a `cifar10` or `folder` data set lies on this machine: downloaded or
    fetched from S3 into `data.cache_dir` once, or the local path as given."""
    uri, cache = cfg.data.uri, Path(cfg.data.cache_dir).expanduser()
    folder = cfg.data.source == "folder"
    if folder and uri is None:
        raise ConfigError("data.uri: data.source 'folder' needs a directory, .tar.gz, .zip or s3:// prefix "
                          "holding train/<class>/ and test/<class>/ images")
    if uri is not None and storage.is_object_store(uri):
        # Only what the loader reads is fetched: a prefix may hold much else.
        wanted = image_folder.is_image if folder else cifar10.is_batch_file
        return storage.backend(uri).cached_copy(uri, cache, wanted)
    return Path(uri).expanduser() if folder else cifar10.local_copy(uri, cache)


def checksum(*arrays: np.ndarray) -> str:
    """The data's identity, as the model card and the resume check record it."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()
