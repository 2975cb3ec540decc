"""Where the job keeps what outlives it: one small interface over URIs.

A URI is a local path or `s3://bucket/prefix`. Callers never ask which:
`backend(uri)` gives a `Storage`, and they stage files in a local directory
and `publish` it, read and write small objects, and list what has been
published. A published directory appears whole or not at all, which is what
checkpoints and TF Serving versions need.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from common import layout, s3
from common.redact import redact
from job.errors import StorageError

_STAGING_PREFIX = ".staging-"
_PROBE_PREFIX = ".probe-"

# What waiting does not mend: the job gives up at once (exit 4) rather than
# retrying for checkpoint.retry_seconds. Anything else local (EIO, an NFS
# timeout) may pass and is retried.
_PERMANENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
              errno.EEXIST, errno.ENAMETOOLONG}
# The causes TensorFlow's file system puts after the path in its errors
# ("<path>; No space left on device [Op:SaveV2]").
_CAUSES = [os.strerror(e) for e in sorted(_PERMANENT)] + [os.strerror(errno.EIO), os.strerror(errno.ENOENT)]


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _umask() -> int:
    # /proc reads it without setting it: os.umask's set-and-restore would give
    # files other threads create meanwhile the wrong mode.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_by_others(root: Path) -> None:
    """Give a staged tree the modes a plain mkdir and open would: folders
    0o777 and files 0o666 less the umask (0755/0644 under the usual 022),
    whatever made them, so a service running as another user can read it."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def local_error(what: str, path: str | Path, exc: OSError) -> StorageError:
    """An OSError as one line: what failed, on which path, and why."""
    cause = exc.strerror or str(exc)
    return StorageError(f"cannot {what} {exc.filename or path}: {cause}", transient=exc.errno not in _PERMANENT)


def _tf_write_error(exc: Exception, path: str | Path) -> StorageError | None:
    """A TensorFlow file-system error (it maps errno to its own classes) as
    one line, or None for anything else. TensorFlow is not imported here:
    only code that already has it writes through it."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(exc, (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                                          tf.errors.FailedPreconditionError, tf.errors.NotFoundError,
                                          tf.errors.AlreadyExistsError)):
        return None
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", exc.message, flags=re.S)
    where, _, cause = message.rpartition("; ")
    cause = next((c for c in _CAUSES if c in cause), cause)
    return StorageError(f"cannot write {where or path}: {cause}", transient=False)


@contextlib.contextmanager
def writing(path: str | Path, key: str | None = None) -> Iterator[None]:
    """Files written locally within (by TensorFlow too): a failure is a
    StorageError naming the file and the cause (a full disk, a read-only
    mount, a denied write), led by the config `key`, not a traceback."""
    try:
        yield
        return
    except StorageError as exc:
        error = exc
    except OSError as exc:
        error = local_error("write", path, exc)
    except Exception as exc:
        error = _tf_write_error(exc, path)
        if error is None:
            raise
    raise (error.named(key) if key else error) from None


def retry(fn, *args, seconds: float):
    """fn(*args), called again through transient StorageErrors (an outage
    longer than boto3's own retries ride out) until `seconds` have passed."""
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return fn(*args)
        except StorageError as exc:
            if not exc.transient or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def malformed(uri: str) -> str | None:
    """Why `uri` cannot name a location at all, or None. Syntax only: no storage is touched."""
    if not is_object_store(uri):
        return None
    bucket, _ = s3.split(uri)
    if not bucket:
        return f"{uri!r} names no bucket; expected s3://bucket/prefix"
    # S3's bucket naming rules (MinIO keeps them too).
    if (not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or ".." in bucket
            or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket)):
        return (f"{bucket!r} in {uri!r} is not a valid S3 bucket name: 3 to 63 lowercase letters, digits, dots "
                f"and hyphens, beginning and ending with a letter or digit, not an IP address")
    return None


class Storage(Protocol):
    """What the job may do with a URI. Each method says what a reader
    elsewhere (another process, a resumed run) can see while it runs; every
    failure is a StorageError naming the URI and the cause, never the
    credentials, and saying whether waiting may mend it (`transient`)."""

    def probe(self, uri: str) -> None:
        """Write and remove a small marker under `uri`: fails as a write there would."""

    def read_bytes(self, uri: str) -> bytes | None:
        """The object's bytes, or None if there is none."""

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Replace the object whole: a reader sees the old bytes or the new, never a mix."""

    def upload_file(self, path: Path, uri: str) -> None:
        """Copy a local file to `uri`, whole, as write_bytes does."""

    def delete_object(self, uri: str) -> None:
        """Remove one object; nothing there is not an error."""

    def exists(self, uri: str) -> bool:
        ...

    def staging(self, uri: str) -> Path:
        """A new local directory to fill and then `publish` under `uri`."""

    def publish(self, staged: Path, uri: str, replace: bool = False) -> None:
        """Make the staged directory `uri`, all at once: until it is complete
        nobody lists or reads it. Without `replace` an existing `uri` wins
        (FileExistsError): two publishers of one name never mix."""

    def published(self, uri: str) -> list[str]:
        """Names of the complete directories directly under `uri`."""

    def delete(self, uri: str) -> None:
        """Remove a published directory; it stops counting as published first."""

    def clean_staging(self, uri: str) -> None:
        """Drop what a crashed run staged under `uri` but never published. Only
        while nothing is being staged there: it cannot tell a leftover from work."""

    def local_copy(self, uri: str) -> Path:
        """A local directory holding the published directory `uri`, each file checked."""

    def cached_copy(self, uri: str, cache_dir: Path, wanted: Callable[[str], bool] | None = None) -> Path:
        """A local copy of an object or prefix, kept across runs and fetched again only if it changed."""

    def working_dir(self, uri: str) -> Path:
        """A local directory whose files reach `uri` at each `sync` (for a local URI, `uri` itself)."""

    def sync(self, uri: str) -> None:
        """Send `working_dir(uri)`'s new and changed files, each one whole."""


class LocalStorage:
    def read_bytes(self, uri: str) -> bytes | None:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise local_error("read", uri, exc) from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(uri)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            # rename is atomic on POSIX: readers see the old file or the new, never half.
            os.replace(tmp, path)
        except OSError as exc:
            raise local_error("write", uri, exc) from None
        finally:
            tmp.unlink(missing_ok=True)  # what a full disk cut short

    def staging(self, uri: str) -> Path:
        # Staged beside the destination so that publishing is a rename. A plain
        # mkdir, not mkdtemp: mkdtemp's 0700 would travel with the rename and
        # hide a published version from a service running as another user.
        staged = Path(uri) / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            staged.mkdir(parents=True)
        except OSError as exc:
            raise local_error("create", staged, exc) from None
        return staged

    def probe(self, uri: str) -> None:
        """Write and remove a small marker in `uri`, creating the folders it
        needs and removing them after: a StorageError if the job could not
        write there. A run that then fails (bad data) leaves nothing behind."""
        folder = Path(uri)
        if folder.exists() and not folder.is_dir():
            raise StorageError(f"cannot write {uri}: it is a file, not a folder", transient=False)
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        marker = folder / f"{_PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_bytes(b"the job checks it can write here\n")
        except OSError as exc:
            raise local_error("write", folder, exc) from None
        finally:
            with contextlib.suppress(OSError):
                marker.unlink()
            for made in missing:  # deepest first; a folder something else filled meanwhile stays
                with contextlib.suppress(OSError):
                    made.rmdir()

    def publish(self, staged: Path, uri: str, replace: bool = False) -> None:
        """Move a staged directory to `uri` in one step.

        Without `replace`, an existing `uri` wins and FileExistsError is
        raised: two exporters racing for one version number must not
        overwrite each other.
        """
        dest = Path(uri)
        try:
            readable_by_others(staged)
            if replace and dest.exists():
                shutil.rmtree(dest)
            os.rename(staged, dest)
        except OSError as exc:
            if dest.exists() and not replace:
                raise FileExistsError(uri) from None
            raise local_error("publish", uri, exc) from None

    def working_dir(self, uri: str) -> Path:
        """A local directory whose files end up at `uri` (for local URIs, itself)."""
        try:
            Path(uri).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise local_error("create", uri, exc) from None
        return Path(uri)

    def sync(self, uri: str) -> None:
        """Send `working_dir(uri)` to `uri`; local files are already there."""

    def published(self, uri: str) -> list[str]:
        root = Path(uri)
        if not root.is_dir():
            return []
        try:
            return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as exc:
            raise local_error("list", uri, exc) from None

    def delete(self, uri: str) -> None:
        shutil.rmtree(uri, ignore_errors=True)

    def delete_object(self, uri: str) -> None:
        try:
            Path(uri).unlink(missing_ok=True)
        except OSError as exc:
            raise local_error("delete", uri, exc) from None

    def cached_copy(self, uri: str, cache_dir: Path, wanted: Callable[[str], bool] | None = None) -> Path:
        return Path(uri).expanduser()

    def local_copy(self, uri: str) -> Path:
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

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def upload_file(self, path: Path, uri: str) -> None:
        """Copy a local file to `uri`; readers see all of it or nothing."""
        dest = Path(uri)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            raise local_error("write", uri, exc) from None
        finally:
            tmp.unlink(missing_ok=True)


class S3Storage:
    """S3 and anything that speaks it (MinIO), configured only by boto3's own
    settings: `AWS_ENDPOINT_URL_S3`, the credential chain, the region.

    S3 has no directory rename, so a directory counts as published once its
    `_COMPLETE` marker (common/layout.py), written after every other object,
    exists. The marker lists each object's SHA-256, checked again on download:
    S3's own checksums guard the transfer, the manifest guards against an
    object replaced or damaged after it was written.
    """

    def __init__(self):
        # The one client policy both images use (retries, timeouts, addressing): common/s3.py.
        self.client = s3.client()
        # As messages name it: a custom endpoint may carry a user and password.
        self.endpoint = redact(self.client.meta.endpoint_url)
        self._synced: dict[Path, tuple[int, int]] = {}

    split = staticmethod(s3.split)

    def _call(self, uri: str, what: str, fn, *args, **kwargs):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, S3UploadFailedError) as exc:
            # boto3's transfer manager (upload_file) wraps the ClientError it met.
            error = exc if isinstance(exc, ClientError) else exc.__context__
            if not isinstance(error, ClientError):
                raise StorageError(f"cannot {what} {uri} at {self.endpoint}: {exc}") from None
            code = error.response.get("Error", {}).get("Code", "error")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            # A refusal (NoSuchBucket, AccessDenied, a quota) stays one; the
            # server's own trouble and throttling pass.
            transient = status >= 500 or status in (408, 429)
            raise StorageError(f"cannot {what} {uri} at {self.endpoint}: {code}", transient) from None
        except BotoCoreError as exc:
            # botocore's messages quote the endpoint, with its password if it has one.
            raise StorageError(f"cannot {what} {uri} at {self.endpoint}: {redact(str(exc))}") from None

    def read_bytes(self, uri: str) -> bytes | None:
        bucket, key = self.split(uri)
        return self._call(uri, "read", _unless_missing, lambda: self.client.get_object(
            Bucket=bucket, Key=key, ChecksumMode="ENABLED")["Body"].read())

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self.split(uri)
        # A PUT is atomic: readers see the old object or the new one.
        self._call(uri, "write", self.client.put_object, Bucket=bucket, Key=key, Body=data,
                   ChecksumAlgorithm="SHA256")

    def staging(self, uri: str) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix="cifar-staging-"))
        except OSError as exc:
            raise local_error("create", tempfile.gettempdir(), exc) from None

    def probe(self, uri: str) -> None:
        """Put and delete a small marker under `uri`: a StorageError if the
        bucket does not exist or the job could not write there."""
        marker = join(uri, f"{_PROBE_PREFIX}{uuid.uuid4().hex}")
        self.write_bytes(marker, b"the job checks it can write here\n")
        self.delete_object(marker)

    def publish(self, staged: Path, uri: str, replace: bool = False) -> None:
        bucket, key = self.split(uri)
        marker = f"{key}/{layout.MARKER}"
        if self.read_bytes(f"s3://{bucket}/{marker}") is not None:
            if not replace:
                raise FileExistsError(uri)
            self.delete(uri)
        manifest = layout.manifest(staged)
        for rel in json.loads(manifest):
            # upload_file is boto3's transfer manager: multipart and parallel for large files.
            self._call(uri, "upload to", self.client.upload_file, str(staged / rel), bucket, f"{key}/{rel}",
                       ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        self._call(uri, "publish", self.client.put_object, Bucket=bucket, Key=marker, Body=manifest)
        shutil.rmtree(staged, ignore_errors=True)

    def _objects(self, uri: str) -> dict[str, dict]:
        """The objects under `uri` as a directory holds files: {key relative to uri: listing entry}."""
        bucket, key = self.split(uri)
        prefix = f"{key}/" if key else ""
        pages = self._call(uri, "list", lambda: list(
            self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)))
        return {obj["Key"][len(prefix):]: obj for page in pages for obj in page.get("Contents", [])}

    def _keys(self, uri: str) -> list[str]:
        return list(self._objects(uri))

    def published(self, uri: str) -> list[str]:
        return layout.published(self._keys(uri))

    def delete_object(self, uri: str) -> None:
        bucket, key = self.split(uri)
        self._call(uri, "delete", self.client.delete_object, Bucket=bucket, Key=key)

    def delete(self, uri: str) -> None:
        bucket, key = self.split(uri)
        keys = [f"{key}/{k}" for k in self._keys(uri)]
        # The marker goes first, so a half-deleted directory no longer counts.
        keys.sort(key=lambda k: not k.endswith("/" + layout.MARKER))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self._call(uri, "delete", self.client.delete_objects, Bucket=bucket, Delete={"Objects": batch})

    def local_copy(self, uri: str) -> Path:
        """Download a published directory, checking every object against its manifest."""
        bucket, key = self.split(uri)
        raw = self.read_bytes(f"{uri}/{layout.MARKER}")
        if raw is None:
            raise StorageError(f"{uri} is not a complete published directory at {self.endpoint}")
        dest = Path(tempfile.mkdtemp(prefix="cifar-download-"))
        try:
            layout.fetch(raw, uri, dest, lambda rel, target: self._call(
                uri, "download", self.client.download_file, bucket, f"{key}/{rel}", str(target)))
        except layout.LayoutError as exc:
            raise StorageError(str(exc)) from None
        return dest

    def cached_copy(self, uri: str, cache_dir: Path, wanted: Callable[[str], bool] | None = None) -> Path:
        """A local copy of `uri` kept in `cache_dir` across runs: an object as a file, or else the
        objects under the prefix `uri` as a directory (those whose relative key `wanted` accepts).

        Each object is cached under its ETag: a second call downloads nothing, and an object
        replaced since is fetched again.
        """
        bucket, key = self.split(uri)
        name = f"s3-{hashlib.sha256(f's3://{bucket}/{key}'.encode()).hexdigest()[:12]}"
        head = None
        if key and not uri.endswith("/"):
            head = self._call(uri, "read", _unless_missing, self.client.head_object, Bucket=bucket, Key=key)
        if head is None:
            return self._cached_prefix(uri, cache_dir / f"{name}-{Path(key).name or bucket}", wanted)
        size, etag = head["ContentLength"], head["ETag"]
        dest = cache_dir / "-".join((name, etag.strip('"'), Path(key).name))
        if not (dest.is_file() and dest.stat().st_size == size):
            self._download(uri, {key: (dest, size, etag)})
        return dest

    _ETAGS = ".s3-etags.json"

    def _cached_prefix(self, uri: str, dest: Path, wanted: Callable[[str], bool] | None) -> Path:
        bucket, key = self.split(uri)
        prefix = f"{key}/" if key else ""
        # Keys no directory can hold ("a//b", "../x", folder markers ending in "/") are not data.
        listed = {rel: obj for rel, obj in self._objects(uri).items()
                  if not {"", ".", ".."} & set(rel.split("/")) and (wanted is None or wanted(rel))}
        etags_file = dest / self._ETAGS
        try:
            recorded = json.loads(etags_file.read_text())
        except (OSError, ValueError):
            recorded = {}
        fresh = {rel: etag for rel, etag in recorded.items() if rel in listed
                 and etag == listed[rel]["ETag"] and (dest / rel).is_file()
                 and (dest / rel).stat().st_size == listed[rel]["Size"]}
        for path in dest.rglob("*"):
            if path.is_file() and path != etags_file and path.relative_to(dest).as_posix() not in listed:
                path.unlink()  # gone from the prefix, so gone from the copy
        # The record never vouches for a file while it is being replaced.
        record = LocalStorage().write_bytes
        record(str(etags_file), json.dumps(fresh).encode())
        self._download(uri, {f"{prefix}{rel}": (dest / rel, obj["Size"], obj["ETag"])
                             for rel, obj in listed.items() if rel not in fresh})
        record(str(etags_file), json.dumps({rel: obj["ETag"] for rel, obj in listed.items()}).encode())
        return dest

    def _download(self, uri: str, objects: dict[str, tuple[Path, int, str]]) -> None:
        """Fetch {key: (local path, size, ETag)} in parallel with boto3's transfer manager, which
        writes each file under a temporary name and renames it whole."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        bucket, _ = self.split(uri)
        with create_transfer_manager(self.client, TransferConfig()) as manager:
            futures = {}
            for key, (path, size, etag) in objects.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                futures[key] = manager.download(bucket, key, str(path), subscribers=[_Listed(size, etag)])
            for key, future in futures.items():
                self._call(f"s3://{bucket}/{key}", "download", future.result)

    def working_dir(self, uri: str) -> Path:
        path = Path(tempfile.gettempdir()) / "cifar-mirror" / uri.replace("://", "/")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def sync(self, uri: str) -> None:
        """Upload the files of `working_dir(uri)` that changed since the last sync."""
        bucket, key = self.split(uri)
        local = self.working_dir(uri)
        for path in local.rglob("*"):
            if not path.is_file():
                continue
            stat = path.stat()
            seen = (stat.st_size, stat.st_mtime_ns)
            if self._synced.get(path) == seen:
                continue
            self._call(uri, "upload to", self.client.upload_file, str(path), bucket,
                       f"{key}/{path.relative_to(local).as_posix()}")
            self._synced[path] = seen

    def clean_staging(self, uri: str) -> None:
        """Staging is local and temporary; nothing is left in the bucket."""

    def exists(self, uri: str) -> bool:
        bucket, key = self.split(uri)
        # A listing, not a HEAD: a missing bucket is then an error, not a missing object. A key
        # sorts before every longer key it prefixes, so the object, if there, comes first.
        listed = self._call(uri, "read", self.client.list_objects_v2, Bucket=bucket, Prefix=key, MaxKeys=1)
        return any(obj["Key"] == key for obj in listed.get("Contents", []))

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = self.split(uri)
        # boto3's transfer manager: a large file goes up in parallel parts, each checksummed.
        self._call(uri, "upload to", self.client.upload_file, str(path), bucket, key,
                   ExtraArgs={"ChecksumAlgorithm": "SHA256"})


def _unless_missing(fn, *args, **kwargs):
    """fn's answer, or None where the object does not exist."""
    from botocore.exceptions import ClientError

    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


class _Listed:
    """An s3transfer subscriber handing the transfer manager what a listing already said, as the
    AWS CLI's sync does: without it each download starts with a HEAD request."""

    def __init__(self, size: int, etag: str):
        self.size, self.etag = size, etag

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self.size)
        # The parts of a large object are then fetched If-Match this ETag.
        future.meta.provide_object_etag(self.etag)


_s3_storages: dict[tuple, S3Storage] = {}


def is_object_store(uri: str) -> bool:
    return uri.startswith("s3://")


class _Named:
    """A Storage whose failures lead with the config key that chose the
    location (`checkpoint.uri: cannot write ...`), whichever method failed."""

    def __init__(self, inner: Storage, key: str):
        self._inner, self.key = inner, key

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except StorageError as exc:
                raise exc.named(self.key) from None

        return call


def backend(uri: str, key: str | None = None) -> Storage:
    """The Storage for `uri`; with `key`, one whose errors name that config key."""
    return _Named(_backend(uri), key) if key else _backend(uri)


def _backend(uri: str) -> Storage:
    if is_object_store(uri):
        # One per set of boto3 settings, as common/s3.py keeps its clients: an S3Storage
        # remembers what it synced, and the settings are read from the environment.
        settings = s3.settings()
        if settings not in _s3_storages:
            _s3_storages[settings] = S3Storage()
        return _s3_storages[settings]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: the {scheme}:// scheme is not supported; use a local path or s3://")
    return LocalStorage()
