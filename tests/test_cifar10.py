"""The CIFAR-10 loader against small files written in the real published formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tarfile

import numpy as np
import pytest

from job import cifar10
from job.cifar10 import load_cifar10
from job.errors import DataError

from helpers import REAL_SMALL, chw_rows, real_small, write_python

TRAIN_COUNTS = (7, 7, 7, 7, 7)
N_TEST = 5


def make_batches(train_counts=TRAIN_COUNTS, n_test=N_TEST, seed=0):
    """{split name: (images uint8 [N,32,32,3] HWC, labels int [N])}."""
    rng = np.random.default_rng(seed)
    counts = dict(zip(cifar10.SPLITS, (*train_counts, n_test), strict=True))
    return {
        name: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
        for name, n in counts.items()
    }


def write_binary(folder, batches):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], chw_rows(images)], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return folder


def make_tar(path, folder, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def assert_matches(result, batches):
    (x_train, y_train), (x_test, y_test) = result
    train = [batches[n] for n in cifar10.SPLITS[:5]]
    n_train = sum(len(y) for _, y in train)
    assert x_train.shape == (n_train, 32, 32, 3) and x_train.dtype == np.uint8
    assert y_train.shape == (n_train,) and y_train.dtype == np.int32
    assert x_test.shape == (len(batches["test_batch"][1]), 32, 32, 3) and x_test.dtype == np.uint8
    assert y_test.dtype == np.int32
    # Batches 1..5 in that order, then the test batch on its own.
    np.testing.assert_array_equal(x_train, np.concatenate([x for x, _ in train]))
    np.testing.assert_array_equal(y_train, np.concatenate([y for _, y in train]))
    np.testing.assert_array_equal(x_test, batches["test_batch"][0])
    np.testing.assert_array_equal(y_test, batches["test_batch"][1])


def test_binary_dir_reads_exact_pixels_and_labels(tmp_path):
    batches = make_batches()
    write_binary(tmp_path, batches)
    result = load_cifar10(str(tmp_path), tmp_path / "cache")
    assert_matches(result, batches)

    # Check the CHW -> HWC conversion against the raw bytes, not our own writer:
    # record 3, row 1, col 2 sits at offset 1 + plane*1024 + 1*32 + 2.
    raw = (tmp_path / "data_batch_1.bin").read_bytes()
    record = raw[3 * 3073 : 4 * 3073]
    (x_train, y_train), _ = result
    assert y_train[3] == record[0]
    assert x_train[3, 1, 2, 0] == record[1 + 0 * 1024 + 34]  # red
    assert x_train[3, 1, 2, 1] == record[1 + 1 * 1024 + 34]  # green
    assert x_train[3, 1, 2, 2] == record[1 + 2 * 1024 + 34]  # blue
    # The first record of batch 2 follows the 7 of batch 1.
    assert x_train[7, 0, 0, 0] == (tmp_path / "data_batch_2.bin").read_bytes()[1]


def test_real_images_read_the_same_from_the_archive_and_its_extracted_folder(tmp_path):
    (x_train, y_train), (x_test, y_test) = load_cifar10(str(REAL_SMALL), tmp_path / "cache")
    assert x_train.shape == (300, 32, 32, 3) and x_test.shape == (200, 32, 32, 3)
    assert set(y_train) == set(range(10)) and set(y_test) == set(range(10))
    folder = real_small(tmp_path / "x")
    for got, expected in zip(load_cifar10(str(folder.parent), tmp_path / "cache"),
                             ((x_train, y_train), (x_test, y_test)), strict=True):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_binary_nested_dir(tmp_path):
    batches = make_batches()
    write_binary(tmp_path / "cifar-10-batches-bin", batches)
    assert_matches(load_cifar10(str(tmp_path), tmp_path / "cache"), batches)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_tar_gz_with_nested_folder(tmp_path, suffix):
    batches = make_batches()
    folder = write_binary(tmp_path / "src", batches)
    archive = make_tar(tmp_path / f"cifar{suffix}", folder, "cifar-10-batches-bin")
    assert_matches(load_cifar10(str(archive), tmp_path / "cache"), batches)


@pytest.mark.parametrize(
    "protocol, legacy_numpy, py2",
    [(2, True, True), (2, False, False), (pickle.HIGHEST_PROTOCOL, False, False)],
    ids=["original-py2", "py3-protocol2", "py3-protocol5"],
)
def test_python_format_dir(tmp_path, protocol, legacy_numpy, py2):
    batches = make_batches()
    write_python(tmp_path / "cifar-10-batches-py", batches, protocol, legacy_numpy, py2)
    assert_matches(load_cifar10(str(tmp_path), tmp_path / "cache"), batches)


def test_python_format_in_tar(tmp_path):
    batches = make_batches()
    folder = write_python(tmp_path / "src", batches)
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", folder, "cifar-10-batches-py")
    assert_matches(load_cifar10(str(archive), tmp_path / "cache"), batches)


def test_binary_wins_when_both_formats_present(tmp_path):
    binary, python = make_batches(seed=1), make_batches(seed=2)
    write_binary(tmp_path / "cifar-10-batches-bin", binary)
    write_python(tmp_path / "cifar-10-batches-py", python)
    assert_matches(load_cifar10(str(tmp_path), tmp_path / "cache"), binary)


def test_any_number_of_records_per_file(tmp_path):
    batches = make_batches(train_counts=(1, 3, 7, 2, 4), n_test=1)
    write_binary(tmp_path / "bin", batches)
    write_python(tmp_path / "py", batches)
    assert_matches(load_cifar10(str(tmp_path / "bin"), tmp_path / "cache"), batches)
    assert_matches(load_cifar10(str(tmp_path / "py"), tmp_path / "cache"), batches)


# --- refusals ----------------------------------------------------------------


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    write_python(tmp_path, make_batches())
    target = tmp_path / "pwned"
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload(target), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_3.*os\.system|data_batch_3.*posix\.system"):
        load_cifar10(str(tmp_path), tmp_path / "cache")
    assert not target.exists()


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"labels": [1]}, "missing"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "labels"),
        ({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, "zero records"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "label 10"),
        ([1, 2, 3], "dict"),
    ],
)
def test_bad_pickle_content(tmp_path, batch, message):
    write_python(tmp_path, make_batches())
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(DataError, match=message) as info:
        load_cifar10(str(tmp_path), tmp_path / "cache")
    assert "test_batch" in str(info.value)


def test_garbage_pickle(tmp_path):
    write_python(tmp_path, make_batches())
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(str(tmp_path), tmp_path / "cache")


@pytest.mark.parametrize("size", [0, 3072, 3073 * 2 + 5])
def test_truncated_binary_file(tmp_path, size):
    write_binary(tmp_path, make_batches())
    path = tmp_path / "data_batch_4.bin"
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(DataError, match=r"data_batch_4\.bin.*multiple of the 3073"):
        load_cifar10(str(tmp_path), tmp_path / "cache")


def test_missing_batch_is_named(tmp_path):
    write_binary(tmp_path, make_batches())
    (tmp_path / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_5\.bin") as info:
        load_cifar10(str(tmp_path), tmp_path / "cache")
    assert "data_batch_4" not in str(info.value)


def test_bad_label(tmp_path):
    write_binary(tmp_path, make_batches())
    path = tmp_path / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[2 * 3073] = 12
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test_batch\.bin: record 2 has label 12"):
        load_cifar10(str(tmp_path), tmp_path / "cache")


def test_corrupt_tar(tmp_path):
    archive = make_tar(tmp_path / "cifar.tar.gz", write_binary(tmp_path / "src", make_batches()), "x")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cifar.tar.gz"):
        load_cifar10(str(archive), tmp_path / "cache")
    (tmp_path / "junk.tgz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="junk.tgz"):
        load_cifar10(str(tmp_path / "junk.tgz"), tmp_path / "cache")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_cifar10(str(tmp_path / "nowhere"), tmp_path / "cache")


def test_directory_without_batches(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_cifar10(str(tmp_path / "empty"), tmp_path / "cache")


# --- downloads -----------------------------------------------------------------


@pytest.fixture
def archive_bytes(tmp_path):
    batches = make_batches()
    folder = write_binary(tmp_path / "src", batches)
    return batches, make_tar(tmp_path / "served.tar.gz", folder, "cifar-10-batches-bin").read_bytes()


def test_http_download_is_cached(tmp_path, server, archive_bytes):
    batches, blob = archive_bytes
    server.files["/data/cifar.tar.gz"] = blob
    cache = tmp_path / "cache"
    assert_matches(load_cifar10(server.url + "/data/cifar.tar.gz", cache), batches)
    assert server.requests == 1
    assert_matches(load_cifar10(server.url + "/data/cifar.tar.gz", cache), batches)
    assert server.requests == 1
    assert [p.name.endswith("-cifar.tar.gz") for p in cache.iterdir()] == [True]


def test_canonical_download_checks_md5(tmp_path, server, archive_bytes, monkeypatch):
    batches, blob = archive_bytes
    server.files["/cifar-10-binary.tar.gz"] = blob
    monkeypatch.setattr(cifar10, "CANONICAL_URL", server.url + "/cifar-10-binary.tar.gz")
    monkeypatch.setattr(cifar10, "CANONICAL_MD5", hashlib.md5(blob).hexdigest())
    cache = tmp_path / "cache"
    assert_matches(load_cifar10(None, cache), batches)
    assert_matches(load_cifar10(None, cache), batches)
    assert server.requests == 1

    # A cached copy that no longer matches is fetched again.
    (cached,) = cache.iterdir()
    cached.write_bytes(b"bit rot")
    assert_matches(load_cifar10(None, cache), batches)
    assert server.requests == 2


def test_checksum_mismatch(tmp_path, server, archive_bytes, monkeypatch):
    server.files["/cifar-10-binary.tar.gz"] = archive_bytes[1]
    monkeypatch.setattr(cifar10, "CANONICAL_URL", server.url + "/cifar-10-binary.tar.gz")
    monkeypatch.setattr(cifar10, "CANONICAL_MD5", "0" * 32)
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: expected MD5 0{32}, got [0-9a-f]{32}"):
        load_cifar10(None, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the bad file nor a temp file stays


def test_http_404(tmp_path, server):
    with pytest.raises(DataError, match=r"/missing.tar.gz.*404"):
        load_cifar10(server.url + "/missing.tar.gz", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar.tar.gz"
    with pytest.raises(DataError, match="could not download http://127.0.0.1"):
        load_cifar10(url, tmp_path / "cache")


# --- other schemes ------------------------------------------------------------


def test_unknown_scheme(tmp_path):
    with pytest.raises(DataError, match="gs://bucket/cifar.tar.gz"):
        load_cifar10("gs://bucket/cifar.tar.gz", tmp_path / "cache")


