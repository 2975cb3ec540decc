"""Finding and loading exported versions under a model base
(`<export.uri>/<model_name>`), local or on S3.

The job publishes a version whole: a local version directory appears by
rename; an S3 version counts once its `_COMPLETE` marker exists. Anything
else under the base (staging, half-uploaded versions) is ignored. This reads
the job's layout without importing the job: the two ship as separate images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

MARKER = "_COMPLETE"


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
    client = _s3()
    version_prefix = f"{prefix}/{version}/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=version_prefix):
        for obj in page.get("Contents", []):
            target = tmp / obj["Key"][len(version_prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    try:
        os.rename(tmp, dest)
    except OSError:  # another worker downloaded it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


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
            retries={"mode": "standard"}, s3={"addressing_style": "path" if custom else "auto"}))
    return _clients[settings]
