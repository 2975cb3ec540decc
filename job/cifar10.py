"""Load the real CIFAR-10 data set from a URL, an object store, a directory or a tarball.

Both published layouts are read: the binary one (``data_batch_1.bin`` ...
``test_batch.bin``) and the Python one (pickled ``data_batch_1`` ...
``test_batch``).  Everything that can go wrong with the data ends in a
DataError that names the file or URI, never in a bare traceback. A URL is
named redacted (common/redact.py): a presigned one is a credential.

Only numpy is imported so that loading (and its tests) stay cheap.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import io
import os
import pathlib
import pickle
import posixpath
import re
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2 still calls the package numpy.core
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

from common.redact import redact, without_query
from job.errors import DataError

CANONICAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CANONICAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

DOWNLOAD_TIMEOUT_S = 60  # per socket operation, so a stalled server cannot hang the job
PROGRESS_LOG_STEP = 0.1  # batch logs: a line per tenth of the archive
PROGRESS_LOG_BYTES = 20_000_000  # ... or per 20 MB when the server sends no Content-Length
PROGRESS_REFRESH_S = 0.2  # a terminal's live line: redrawn at most this often
RECORD_BYTES = 1 + 3 * 32 * 32
SPLITS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
BIN_NAMES = [s + ".bin" for s in SPLITS]
SUBFOLDERS = ("cifar-10-batches-bin", "cifar-10-batches-py")
# The largest batch file CIFAR-10 has is a python-format pickle of 31,035,704
# bytes (a binary one is 30,730,000); twice that bounds what one file may
# make the job read, however small its archive (a sparse tar member of zeros).
MAX_BATCH_BYTES = 64 << 20

Arrays = tuple[np.ndarray, np.ndarray]


def load_cifar10(uri: str | None, cache_dir: pathlib.Path, shown_as: str | None = None) -> tuple[Arrays, Arrays]:
    """Returns ((x_train, y_train), (x_test, y_test)); x uint8 [N,32,32,3] (NHWC), y int32 [N].

    `uri` is a local directory or archive, or an http(s) URL; object-store
    URIs are brought to a local copy by job.storage before they get here,
    and `shown_as` then names the original in messages.
    """
    return read(local_copy(uri, cache_dir), shown_as)


def local_copy(uri: str | None, cache_dir: pathlib.Path) -> pathlib.Path:
    """Where the data of `uri` lies on this machine: downloaded (once) for a URL, as given for a path."""
    cache_dir = pathlib.Path(cache_dir)
    if uri is None:
        # Read the globals at call time, so tests can point them at a local server.
        return _download(CANONICAL_URL, cache_dir, expected_md5=CANONICAL_MD5)
    if uri.startswith(("http://", "https://")):
        return _download(uri, cache_dir)
    if "://" in uri:
        raise DataError(f"cannot load CIFAR-10 from {uri}: unsupported URI scheme")
    return pathlib.Path(uri).expanduser()


def read(path: pathlib.Path, shown_as: str | None = None) -> tuple[Arrays, Arrays]:
    """Parse a local directory or archive (see load_cifar10)."""
    if not path.exists():
        raise DataError(f"CIFAR-10 data not found: {path} does not exist")
    shown = shown_as or str(path)
    groups = _directory_groups(path, shown) if path.is_dir() else _tar_groups(path, shown)
    where, files, binary = _pick(groups, shown)

    parse = _parse_binary if binary else _parse_pickle
    batches = [parse(files[n], posixpath.join(where, n)) for n in (BIN_NAMES if binary else SPLITS)]
    x_train = np.concatenate([x for x, _ in batches[:5]])
    y_train = np.concatenate([y for _, y in batches[:5]])
    return (x_train, y_train), batches[5]


# --- getting a local copy --------------------------------------------------


def _cache_path(uri: str, cache_dir: pathlib.Path) -> pathlib.Path:
    # Hash the whole URI (two buckets may hold the same file name) but keep the
    # base name so that a person looking in the cache knows what they see;
    # never the query, which in a presigned URL is a credential.
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", without_query(uri).rstrip("/").rsplit("/", 1)[-1])[:64]
    return cache_dir / f"{digest}-{base or 'download'}"


def _md5(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _download(url: str, cache_dir: pathlib.Path, expected_md5: str | None = None) -> pathlib.Path:
    dest, shown = _cache_path(url, cache_dir), redact(url)
    if dest.is_file() and (expected_md5 is None or _md5(dest) == expected_md5):
        return dest  # a cached file with a wrong checksum falls through and is fetched again

    def get(tmp: pathlib.Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
                length = resp.headers.get("Content-Length")
                progress = _Progress(shown, int(length) if length and length.isdigit() else None)
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    progress.advance(len(chunk))
                progress.finish()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise DataError(f"could not download {shown}: {e}") from e
        # http.client ends a body cut short by a closed connection without an
        # error; cached, such a file would fail every later run.
        if progress.total is not None and progress.done != progress.total:
            raise DataError(f"could not download {shown}: the connection closed after {progress.done} of "
                            f"{progress.total} bytes")
        if expected_md5 is not None and (got := _md5(tmp)) != expected_md5:
            raise DataError(f"checksum mismatch for {shown}: expected MD5 {expected_md5}, got {got}")

    _into_cache(dest, get)
    print(f"cached {shown} at {dest}", file=sys.stderr, flush=True)
    return dest


class _Progress:
    """The download's progress on stderr: one live line on a terminal; in
    batch logs a plain line per PROGRESS_LOG_STEP of the archive (or per
    PROGRESS_LOG_BYTES when the server gives no length), so a log never holds
    thousands of them."""

    def __init__(self, shown: str, total: int | None):
        self.total, self.done = total, 0
        self.stream = sys.stderr
        self.live = self.stream.isatty()
        self.start = self.last_draw = time.monotonic()
        self.next_log = self._log_every()
        size = f" ({total / 1e6:.1f} MB)" if total is not None else ""
        self._line(f"downloading {shown}{size}")

    def _log_every(self) -> int:
        return max(1, int(self.total * PROGRESS_LOG_STEP)) if self.total else PROGRESS_LOG_BYTES

    def _status(self) -> str:
        rate = self.done / 1e6 / max(time.monotonic() - self.start, 1e-6)
        if self.total:
            return (f"{self.done / 1e6:.1f} / {self.total / 1e6:.1f} MB  {100 * self.done // self.total:3d} %  "
                    f"{rate:.1f} MB/s")
        return f"{self.done / 1e6:.1f} MB  {rate:.1f} MB/s"

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live:
            if now - self.last_draw >= PROGRESS_REFRESH_S:
                self.last_draw = now
                self.stream.write(f"\r  {self._status()}\033[K")
                self.stream.flush()
        elif self.done >= self.next_log and self.done != self.total:
            self._line(f"  {self._status()}")
            while self.next_log <= self.done:
                self.next_log += self._log_every()

    def finish(self) -> None:
        if self.live:
            self.stream.write(f"\r  {self._status()}\033[K\n")
            self.stream.flush()
        else:
            self._line(f"  {self._status()}")


def _into_cache(dest: pathlib.Path, get) -> pathlib.Path:
    # Write under a temporary name and rename: a crash or a failed checksum
    # never leaves a half file where the next run would trust it.
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        get(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --- finding the batch files -------------------------------------------------


def is_batch_file(relative: str) -> bool:
    """Whether a path inside a data directory is one the loader may read."""
    folder, _, name = relative.rpartition("/")
    return folder in ("", *SUBFOLDERS) and name in BIN_NAMES + SPLITS


def _directory_groups(path: pathlib.Path, shown: str) -> dict[str, dict[str, bytes | pathlib.Path]]:
    groups = {}
    for sub in ("", *SUBFOLDERS):
        if (path / sub).is_dir():
            groups[posixpath.join(shown, sub) if sub else shown] = {
                n: path / sub / n for n in BIN_NAMES + SPLITS if (path / sub / n).is_file()}
    return groups


def _tar_groups(path: pathlib.Path, shown: str) -> dict[str, dict[str, bytes | pathlib.Path]]:
    # One streaming pass over the archive: seeking back inside a gzip stream
    # means decompressing it again from the start.
    groups: dict[str, dict[str, bytes | pathlib.Path]] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = posixpath.normpath(member.name)
                folder, base = posixpath.split(name)
                if member.isfile() and base in BIN_NAMES + SPLITS:
                    # The header's size, sparse members' expanded one: checked before a byte is read.
                    _check_size(member.size, f"{shown}:{name}")
                    groups.setdefault(f"{shown}:{folder}" if folder else shown, {})[base] = (
                        tar.extractfile(member).read()
                    )
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{shown} is not a readable tar archive: {e}") from e
    return groups


def _pick(groups, shown: str) -> tuple[str, dict, bool]:
    # The binary layout wins whenever any of its files is present anywhere;
    # once a layout is chosen, all six of its files must be there.
    for names, binary in ((BIN_NAMES, True), (SPLITS, False)):
        for where, files in groups.items():
            if any(n in files for n in names):
                missing = [n for n in names if n not in files]
                if missing:
                    raise DataError(f"{where}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
                return where, files, binary
    raise DataError(f"no CIFAR-10 batch files (data_batch_1.bin ... or data_batch_1 ...) found in {shown}")


# --- parsing ---------------------------------------------------------------


def _check_size(size: int, name: str) -> None:
    if size > MAX_BATCH_BYTES:
        raise DataError.oversized(name, size, MAX_BATCH_BYTES, "a CIFAR-10 batch file")


def _read(source: bytes | pathlib.Path, name: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        _check_size(source.stat().st_size, name)
        return source.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {name}: {e}") from e


def _check(x: np.ndarray, y: np.ndarray, name: str) -> Arrays:
    bad = np.flatnonzero((y < 0) | (y > 9))
    if bad.size:
        raise DataError(f"{name}: record {bad[0]} has label {y[bad[0]]}, expected 0-9")
    # Records store each channel as a 32x32 plane (CHW); the model wants HWC.
    x = np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y.astype(np.int32)


def _parse_binary(source, name: str) -> Arrays:
    data = _read(source, name)
    if not data or len(data) % RECORD_BYTES:
        raise DataError(
            f"{name}: {len(data)} bytes is not a positive multiple of the {RECORD_BYTES}-byte "
            "record size (truncated or corrupt)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    return _check(records[:, 1:], records[:, 0].astype(np.int32), name)


# Exactly what an ndarray pickle needs: the original files (Python 2, protocol
# 2) use _reconstruct; a Python 3 re-dump at protocol 5 uses _frombuffer.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, name: str):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise DataError(f"{self.name}: refusing to unpickle {module}.{name} (not CIFAR-10 data)")
        return found


def _parse_pickle(source, name: str) -> Arrays:
    try:
        batch = _SafeUnpickler(_read(source, name), name).load()
    except DataError:
        raise
    except Exception as e:  # a malformed stream can fail in many ways; all mean "corrupt"
        raise DataError(f"{name}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{name}: expected a pickled dict, got {type(batch).__name__}")
    # Files written by Python 3 code have str keys; the originals have bytes.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{name}: missing 'data' or 'labels' key")
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError) as e:
        raise DataError(f"{name}: 'labels' is not a list of integers") from e
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{name}: 'data' should be a uint8 array of shape [N, 3072], got {got}")
    if not len(data):
        raise DataError(f"{name}: zero records")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(data):
        raise DataError(f"{name}: 'labels' should be {len(data)} integers, got {y.dtype} {y.shape}")
    return _check(data, y, name)
