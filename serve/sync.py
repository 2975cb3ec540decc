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
from serve import checks, store

log = logging.getLogger("serve.sync")


def sync_once(source: str, dest: Path, min_accuracy: float | None = None,
              refused: dict[int, str] | None = None) -> list[int]:
    """Copy the versions under `source` that `dest` lacks; returns those copied.

    A damaged version, or one failing a check, is refused (store.VersionError,
    after the others are copied): TF Serving keeps the versions it has, and one
    bad version does not hold back the newer ones. Refusals are noted in
    `refused` (version -> store.fingerprint): a version refused before is
    neither fetched nor told again until its files change.
    """
    refused = {} if refused is None else refused
    dest.mkdir(parents=True, exist_ok=True)
    have = {int(p.name) for p in dest.iterdir() if p.name.isdigit()}
    copied, refusals = [], []
    for version in store.versions(source):
        if version in have:
            continue
        stamp = store.fingerprint(source, version)
        if refused.get(version) == stamp:
            continue
        staging = dest / f".sync-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            downloaded = store.local_path(source, version, str(staging))
            _check(downloaded, min_accuracy)
        except store.VersionError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            log.error("refused version %d of %s: %s", version, source, exc)
            refused[version] = stamp
            refusals.append(str(exc))
            continue
        if Path(downloaded).resolve() == (Path(source) / str(version)).resolve():
            shutil.copytree(downloaded, staging / "v")  # a local source: copy, never move, the original
            downloaded = staging / "v"
        os.rename(downloaded, dest / str(version))
        shutil.rmtree(staging, ignore_errors=True)
        log.info("synced version %d of %s into %s", version, source, dest)
        copied.append(version)
    if refusals:
        raise store.VersionError("; ".join(refusals))
    return copied


def _check(path: Path, min_accuracy: float | None) -> None:
    with checks.loadable():
        signature = checks.load(path)[1][layout.SIGNATURE]
        if not checks.check(path, signature, min_accuracy):
            log.warning("%s has no probe record (exported before the job wrote one): mirrored unchecked", path)


def run(source: str, dest: Path, every: float, once: bool, heartbeat: Path | None = None) -> None:
    """Sync every `every` seconds (or `once`); after each pass that reached the
    store, touch `heartbeat`, which `cifar-serve sync --check` reads."""
    from serve.settings import Settings

    # The service's own setting, read from the same environment (SERVE_MIN_ACCURACY).
    min_accuracy = Settings().min_accuracy
    refused: dict[int, str] = {}
    failing = None  # the outage's message: told when it starts or changes, not at every pass
    while True:
        try:
            sync_once(source, dest, min_accuracy, refused)
            outage = None
        except store.VersionError:  # versions refused, each told by sync_once: the store answers
            if once:
                raise
            outage = None
        except Exception as exc:  # an outage: try again next round rather than exit the sidecar
            if once:
                raise
            outage = str(exc)
            if outage != failing:
                log.warning("sync from %s failed (tried again every %gs): %s", source, every, exc)
        if failing and not outage:
            log.info("sync from %s works again", source)
        failing = outage
        if heartbeat and not outage:
            heartbeat.touch()
        if once:
            return
        time.sleep(every)


def stale(heartbeat: Path, max_age: float) -> str | None:
    """What is wrong if the sync has not reached the store within `max_age`
    seconds (by its `heartbeat`), else None: `cifar-serve sync --check`."""
    try:
        age = time.time() - heartbeat.stat().st_mtime
    except FileNotFoundError:
        return f"{heartbeat} does not exist: the sync has not reached the store yet"
    return f"the sync last reached the store {age:.0f}s ago ({heartbeat})" if age > max_age else None
