"""`cifar-job fetch-data`: bring the config's data to hand the way `train`
would (downloaded once, verified, cached), and optionally store the archive
in a store of one's own, so that a cluster or `docker compose` reads it from
there and never from the internet again.

The CIFAR-10 path imports only numpy, so fetching costs no TensorFlow start-up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from job import cifar10, storage
from job.config import Config
from job.errors import ConfigError
from job.report import Console


def fetch(cfg: Config, console: Console, to: str | None = None) -> dict | None:
    """The data's summary ({source, uri, train, test, checksum}), or None when
    `to` already holds an object and so nothing was fetched."""
    if to is not None:
        store = _destination(cfg, to)
        # Checked first: a second `docker compose up` must not download 160 MB to learn it had no need.
        if store.exists(to):
            console.info(f"{to} already holds an object: nothing downloaded or uploaded")
            return None
    if cfg.data.source != "cifar10":
        from job import data  # brings TensorFlow: only generated data and image folders go this way

        splits = data.load(cfg)
        return {"source": cfg.data.source, "uri": cfg.data.uri, "train": len(splits.x_train) + len(splits.x_val),
                "test": len(splits.x_test), "checksum": splits.checksum}

    origin, local = _local_copy(cfg)
    (x, y), (x_test, y_test) = cifar10.load_cifar10(local, Path(cfg.data.cache_dir).expanduser(),
                                                    shown_as=cfg.data.uri)
    if to is not None:
        archive = Path(local).expanduser()
        if not archive.is_file():
            raise ConfigError(f"--to stores a single archive, but data.uri {origin} is a prefix of several objects")
        # Stored only once parsed, so a corrupt archive never becomes the store's copy.
        store.upload_file(archive, to)
        console.info(f"stored {origin} at {to}")
    return {"source": "cifar10", "uri": origin, "train": len(x), "test": len(x_test),
            "checksum": checksum(x, y, x_test, y_test)}


def checksum(*arrays: np.ndarray) -> str:
    """The data's identity as `job.data.load` records it in the model card."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()


def _destination(cfg: Config, to: str) -> storage.LocalStorage | storage.S3Storage:
    if cfg.data.source != "cifar10":
        raise ConfigError(f"--to stores the CIFAR-10 archive the data comes from (data.source: cifar10), but "
                          f"data.source is {cfg.data.source}")
    uri = cfg.data.uri
    if uri is not None and "://" not in uri and Path(uri).expanduser().is_dir():
        raise ConfigError(f"--to stores a single archive, but data.uri {uri} is a directory")
    if storage.is_object_store(to) and not storage.S3Storage.split(to)[1]:
        raise ConfigError(f"--to {to} names a bucket; give the object's key: s3://bucket/path/cifar-10.tar.gz")
    return storage.backend(to)


def _local_copy(cfg: Config) -> tuple[str, str]:
    """(where the data comes from, a local file or directory holding it), as `train` gets it;
    a scheme it does not know is passed on for the loader to refuse."""
    uri = cfg.data.uri
    cache = Path(cfg.data.cache_dir).expanduser()
    if uri is None:
        return cifar10.CANONICAL_URL, str(cifar10._download(cifar10.CANONICAL_URL, cache, cifar10.CANONICAL_MD5))
    if uri.startswith(("http://", "https://")):
        return uri, str(cifar10._download(uri, cache))
    if storage.is_object_store(uri):
        # Of a prefix, only what the loader reads is fetched, as for `train`.
        return uri, str(storage.backend(uri).cached_copy(uri, cache, cifar10.is_batch_file))
    return uri, uri
