"""`cifar-job fetch-data`: bring the config's data to hand the way `train`
would (downloaded once, verified, cached), and optionally store the archive
in a store of one's own, so that a cluster or `docker compose` reads it from
there and never from the internet again.

No TensorFlow is imported, so fetching costs no TensorFlow start-up.
"""

from __future__ import annotations

from pathlib import Path

from job import cifar10, sources, storage
from job.config import Config
from job.errors import ConfigError
from job.report import Console


def fetch(cfg: Config, console: Console, to: str | None = None) -> dict | None:
    """The data's summary ({source, uri, train, test, checksum}), or None when
    `to` already holds an object and so nothing was fetched."""
    if to is not None:
        store = _destination(cfg, to)
        # Checked first: a second `docker compose up` must not download 170 MB to learn it had no need.
        if store.exists(to):
            console.info(f"{to} already holds an object: nothing downloaded or uploaded")
            return None
    local = None if cfg.data.source == "synthetic" else sources.local_copy(cfg)
    splits = sources.load(cfg, local)
    origin = cfg.data.uri or (cifar10.CANONICAL_URL if cfg.data.source == "cifar10" else None)
    if to is not None:
        if not local.is_file():
            raise ConfigError(f"--to stores a single archive, but data.uri {origin} is a prefix of several objects")
        # Stored only once parsed, so a corrupt archive never becomes the store's copy.
        store.upload_file(local, to)
        console.info(f"stored {origin} at {to}")
    return {"source": cfg.data.source, "uri": origin, "train": len(splits.x_train) + len(splits.x_val),
            "test": len(splits.x_test), "checksum": splits.checksum}


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
