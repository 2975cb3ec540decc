"""The model store: finding and fetching exported versions under a model base
(`<export.uri>/<model_name>`), local or on S3 (with common/s3.py's client),
as common/layout.py lays them out: only complete versions count, and an S3
download is checked against the version's manifest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from common import layout, s3

# A version not to be served: its files disagree with its manifest (or a check refused it).
VersionError = layout.LayoutError


def versions(base: str) -> list[int]:
    """Complete version numbers under `base`, ascending."""
    if base.startswith("s3://"):
        bucket, prefix = s3.split(base)
        keys = [obj["Key"][len(prefix) + 1:]
                for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
                for obj in page.get("Contents", [])]
        return sorted(int(name) for name in layout.published(keys) if name.isdigit())
    return layout.local_versions(Path(base))


def where(base: str, version: int) -> str:
    """The version's own path or URI, for messages."""
    return f"{base.rstrip('/')}/{version}"


def describe(exc: BaseException) -> str:
    """An error for a log line: its type and first line (TensorFlow's messages
    run on for lines of advice; the first says what failed)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def fingerprint(base: str, version: int) -> str:
    """Changes when `version`'s files are replaced: a version refused once is
    checked again only then."""
    if base.startswith("s3://"):
        bucket, prefix = s3.split(base)
        # Every object, not the marker alone: a damaged file uploaded again under the same manifest counts.
        pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{version}/")
        objects = [(o["Key"], o["ETag"], str(o["LastModified"])) for page in pages for o in page.get("Contents", [])]
        return hashlib.sha256(repr(objects).encode()).hexdigest()
    root = Path(base) / str(version)
    # Modes count: a version refused because it could not be read is tried again once chmod makes it readable.
    stats = [(str(p), p.stat()) for p in [root, *sorted(root.rglob("*"))]]
    return hashlib.sha256(repr([(p, s.st_mode, s.st_mtime_ns, s.st_size) for p, s in stats]).encode()).hexdigest()


def card(base: str, version: int) -> dict | None:
    """`version`'s model card, read alone (the TF Serving backend has no copy of the version); on S3
    only as the version's manifest recorded it. None when the version has none."""
    if not base.startswith("s3://"):
        return layout.read_card(Path(base) / str(version))
    bucket, prefix = s3.split(base)
    client = s3.client()
    where = f"s3://{bucket}/{prefix}/{version}"
    marker = client.get_object(Bucket=bucket, Key=f"{prefix}/{version}/{layout.MARKER}")["Body"].read()
    digest = layout.read_manifest(marker, where).get(layout.CARD)
    if digest is None:
        return None
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/{version}/{layout.CARD}")["Body"].read(layout.CARD_LIMIT + 1)
    if hashlib.sha256(body).hexdigest() != digest:
        raise VersionError(f"{where}/{layout.CARD} is corrupt: its SHA-256 differs from the one its "
                           f"{layout.MARKER} manifest recorded when it was published")
    return layout.parse_card(body)


def local_path(base: str, version: int, cache_dir: str) -> Path:
    """A local directory holding `version` (downloaded once, for S3)."""
    if not base.startswith("s3://"):
        return Path(base) / str(version)
    bucket, prefix = s3.split(base)
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

    client = s3.client()
    where = f"s3://{bucket}/{version_prefix}"
    body = client.get_object(Bucket=bucket, Key=f"{version_prefix}/{layout.MARKER}")["Body"].read()

    def download(rel: str, target: Path) -> None:
        try:
            client.download_file(bucket, f"{version_prefix}/{rel}", str(target))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                raise
            raise VersionError(f"{where}/{rel} is listed in its {layout.MARKER} manifest but missing") from None

    layout.fetch(body, where, into, download)

