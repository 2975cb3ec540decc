"""`cifar-serve sync`: mirror complete model versions from object storage
into a local folder that TF Serving watches.

TF Serving 2.7 and later cannot read s3:// (tensorflow/serving#1963,
#2062), and it fails on a version directory it finds half-written
(tensorflow/serving#631). So each version is downloaded under a hidden name
and renamed into place: TF Serving sees a version whole or not at all.
A version is mirrored only if it passes the service's own checks
(serve/checks.py: its probe record, SERVE_MIN_ACCURACY), since TF Serving
serves whatever appears in its folder.
Used by docker-compose and as a Kubernetes sidecar.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from common import layout
from serve import checks, models

log = logging.getLogger("serve.sync")


def sync_once(source: str, dest: Path, min_accuracy: float | None = None) -> list[int]:
    """Copy the versions under `source` that `dest` lacks; returns those copied.

    A damaged version, or one failing a check, is refused (models.VersionError,
    after the others are copied): TF Serving keeps the versions it has, and one
    bad version does not hold back the newer ones.
    """
    dest.mkdir(parents=True, exist_ok=True)
    have = {int(p.name) for p in dest.iterdir() if p.name.isdigit()}
    copied, refused = [], []
    for version in models.versions(source):
        if version in have:
            continue
        staging = dest / f".sync-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            downloaded = models.local_path(source, version, str(staging))
            _check(downloaded, min_accuracy)
        except models.VersionError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            log.error("refused version %d of %s: %s", version, source, exc)
            refused.append(str(exc))
            continue
        if Path(downloaded).resolve() == (Path(source) / str(version)).resolve():
            shutil.copytree(downloaded, staging / "v")  # a local source: copy, never move, the original
            downloaded = staging / "v"
        os.rename(downloaded, dest / str(version))
        shutil.rmtree(staging, ignore_errors=True)
        log.info("synced version %d of %s into %s", version, source, dest)
        copied.append(version)
    if refused:
        raise models.VersionError("; ".join(refused))
    return copied


def _check(path: Path, min_accuracy: float | None) -> None:
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures[layout.SIGNATURE]
    if not checks.check(path, signature, min_accuracy):
        log.warning("%s has no probe record (exported before the job wrote one): mirrored unchecked", path)


def run(source: str, dest: Path, every: float, once: bool) -> None:
    from serve.settings import Settings

    # The service's own setting, read from the same environment (SERVE_MIN_ACCURACY).
    min_accuracy = Settings().min_accuracy
    while True:
        try:
            sync_once(source, dest, min_accuracy)
        except Exception as exc:  # an outage: try again next round rather than exit the sidecar
            if once:
                raise
            log.warning("sync from %s failed: %s", source, exc)
        if once:
            return
        time.sleep(every)
