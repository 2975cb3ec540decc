"""Where the job keeps what outlives it: one small interface over URIs.

A URI is a local path or `s3://bucket/prefix`. Callers never ask which; they
stage files in a local directory and `publish` it, read and write small
objects, and list what has been published. A published directory appears
whole or not at all, which is what checkpoints and TF Serving versions need.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from job.errors import StorageError

_STAGING_PREFIX = ".staging-"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_remote(uri: str) -> bool:
    return "://" in uri


class LocalStorage:
    def read_bytes(self, uri: str) -> bytes | None:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            # rename is atomic on POSIX: readers see the old file or the new, never half.
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {exc.strerror}") from None

    def staging(self, uri: str) -> Path:
        # Staged beside the destination so that publishing is a rename.
        Path(uri).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=uri))

    def publish(self, staged: Path, uri: str, replace: bool = False) -> None:
        """Move a staged directory to `uri` in one step.

        Without `replace`, an existing `uri` wins and FileExistsError is
        raised: two exporters racing for one version number must not
        overwrite each other.
        """
        dest = Path(uri)
        if replace and dest.exists():
            shutil.rmtree(dest)
        try:
            os.rename(staged, dest)
        except OSError as exc:
            if dest.exists():
                raise FileExistsError(uri) from None
            raise StorageError(f"cannot publish {uri}: {exc.strerror}") from None

    def working_dir(self, uri: str) -> Path:
        """A local directory whose files end up at `uri` (for local URIs, itself)."""
        Path(uri).mkdir(parents=True, exist_ok=True)
        return Path(uri)

    def sync(self, uri: str) -> None:
        """Send `working_dir(uri)` to `uri`; local files are already there."""

    def published(self, uri: str) -> list[str]:
        root = Path(uri)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, uri: str) -> None:
        shutil.rmtree(uri, ignore_errors=True)

    def local_copy(self, uri: str, cache: Path | None = None) -> Path:
        """A local directory holding what is at `uri` (for local URIs, itself)."""
        if not Path(uri).exists():
            raise StorageError(f"{uri} does not exist")
        return Path(uri)

    def clean_staging(self, uri: str) -> None:
        """Drop what a crashed run staged but never published."""
        root = Path(uri)
        if root.is_dir():
            for leftover in root.glob(_STAGING_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)


def backend(uri: str) -> LocalStorage:
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: the {scheme}:// scheme is not supported here; use a local path")
    return LocalStorage()
