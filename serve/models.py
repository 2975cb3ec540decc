"""Finding and loading exported versions under a model base
(`<export.uri>/<model_name>`), local or on S3.

The job publishes a version whole: a local version directory appears by
rename; an S3 version counts once its `_COMPLETE` marker exists. Anything
else under the base (staging, half-uploaded versions) is ignored. The marker
is a manifest, `{relative path: SHA-256}`: a download fetches exactly those
files and checks each, so an object replaced or damaged after publishing is
refused rather than served. This reads the job's layout without importing
the job: the two ship as separate images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = "_COMPLETE"


class VersionError(Exception):
    """A published version whose objects disagree with its manifest: not to be served."""


def versions(base: str) -> list[int]:
    """Complete version numbers under `base`, ascending."""
    if base.startswith("s3://"):
        bucket, prefix = _split(base)
        found = set()
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1:].split("/")
                if len(rel) == 2 and rel[1] == MARKER and rel[0].isdigit():
                    found.add(int(rel[0]))
        return sorted(found)
    root = Path(base)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / "saved_model.pb").is_file())


def fingerprint(base: str, version: int) -> str:
    """Changes when `version`'s files are replaced: a version refused once is
    checked again only then."""
    if base.startswith("s3://"):
        bucket, prefix = _split(base)
        return _s3().head_object(Bucket=bucket, Key=f"{prefix}/{version}/{MARKER}")["ETag"]
    root = Path(base) / str(version)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(repr([(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files]).encode()).hexdigest()


def local_path(base: str, version: int, cache_dir: str) -> Path:
    """A local directory holding `version` (downloaded once, for S3)."""
    if not base.startswith("s3://"):
        return Path(base) / str(version)
    bucket, prefix = _split(base)
    key = hashlib.sha256(f"{base}/{version}".encode()).hexdigest()[:16]
    dest = Path(cache_dir) / f"{key}-{version}"
    if dest.is_dir():
        return dest
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".download-"))
    try:
        _download(bucket, f"{prefix}/{version}", tmp)
    except BaseException:
        # Only a checked copy may reach `dest`, which later loads trust without looking.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, dest)
    except OSError:  # another worker downloaded it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(bucket: str, version_prefix: str, into: Path) -> None:
    """Fetch the files `version_prefix`'s manifest lists into `into`, checking each one's SHA-256."""
    from botocore.exceptions import ClientError

    client = _s3()
    where = f"s3://{bucket}/{version_prefix}"
    body = client.get_object(Bucket=bucket, Key=f"{version_prefix}/{MARKER}")["Body"].read()
    try:
        manifest = json.loads(body)
        if not isinstance(manifest, dict) or not all(isinstance(d, str) for d in manifest.values()):
            raise ValueError
    except ValueError:
        raise VersionError(f"{where}/{MARKER} is not a manifest of {{file: SHA-256}}") from None
    for rel, digest in manifest.items():
        if {"", ".", ".."} & set(rel.split("/")):
            # A path like "../x" would write outside the download folder.
            raise VersionError(f"{where}/{MARKER} lists {rel!r}, which is not a file inside the version")
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, f"{version_prefix}/{rel}", str(target))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                raise
            raise VersionError(f"{where}/{rel} is listed in its {MARKER} manifest but missing") from None
        if _sha256(target) != digest:
            raise VersionError(f"{where}/{rel} is corrupt: its SHA-256 differs from the one its "
                               f"{MARKER} manifest recorded when it was published")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


_clients: dict[tuple, object] = {}


def _s3():
    """One client per set of boto3 settings: the watcher asks every few seconds,
    and making a client costs tens of milliseconds."""
    import boto3
    from botocore.config import Config

    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    settings = (custom, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if settings not in _clients:
        _clients[settings] = boto3.client("s3", config=Config(
            retries={"mode": "standard"}, s3={"addressing_style": "path" if custom else "auto"},
            # Without these a stalled endpoint hangs the watcher (or the sync sidecar) for good.
            connect_timeout=5, read_timeout=30))
    return _clients[settings]
