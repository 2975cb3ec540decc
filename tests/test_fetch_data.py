"""`cifar-job fetch-data` and the download's progress display, against a local
HTTP server standing in for the canonical archive's host (there is no
internet here) serving a 500-image slice of the real CIFAR-10."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import boto3
import pytest
import yaml

from job import cifar10
from job.cli import main
from job.errors import DataError

from helpers import REAL_SMALL, clean_env, cli



@pytest.fixture
def canonical(server, monkeypatch):
    """The canonical archive's URL and MD5 pointed at the local server's real 500-image slice."""
    blob = REAL_SMALL.read_bytes()
    server.files["/cifar-10-binary.tar.gz"] = blob
    monkeypatch.setattr(cifar10, "CANONICAL_URL", server.url + "/cifar-10-binary.tar.gz")
    monkeypatch.setattr(cifar10, "CANONICAL_MD5", hashlib.md5(blob).hexdigest())
    return server


def fetch_data(capsys, *args: str) -> tuple[int, str, str]:
    """`cifar-job fetch-data ARGS` in this process (so the canonical URL can point here): (code, stdout, stderr)."""
    code = main(["fetch-data", "--set", "data.source=cifar10", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --- the download's progress -------------------------------------------------------------


def test_batch_logs_get_a_line_per_tenth_and_where_it_is_cached(server, tmp_path, capsys):
    server.files["/big.tar.gz"] = bytes(30 << 20)
    path = cifar10._download(server.url + "/big.tar.gz", tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"downloading {server.url}/big.tar.gz (31.5 MB)"
    assert lines[-1] == f"cached {server.url}/big.tar.gz at {path}"
    percents = [int(re.search(r"(\d+) %", line).group(1)) for line in lines[1:-1]]
    # About one line per 10 %, in order, ending at 100 %: never a line per chunk.
    assert 9 <= len(percents) <= 11 and percents == sorted(percents) and percents[-1] == 100
    assert all(re.fullmatch(r"  [\d.]+ / 31\.5 MB +\d+ %  [\d.]+ MB/s", line) for line in lines[1:-1])
    assert path.read_bytes() == server.files["/big.tar.gz"]


def test_without_a_length_batch_logs_count_megabytes(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cifar10, "PROGRESS_LOG_BYTES", 2_000_000)
    server.send_length = False
    server.files["/a.tar.gz"] = bytes(9 << 20)
    cifar10._download(server.url + "/a.tar.gz", tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"downloading {server.url}/a.tar.gz"
    assert [re.match(r"  ([\d.]+) MB  [\d.]+ MB/s$", line).group(1) for line in lines[1:-1]] == [
        "2.1", "4.2", "6.3", "8.4", "9.4"]


def test_a_terminal_gets_one_live_line(server, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(cifar10, "PROGRESS_REFRESH_S", 0)
    server.files["/a.tar.gz"] = bytes(5 << 20)
    path = cifar10._download(server.url + "/a.tar.gz", tmp_path)
    lines = terminal.getvalue().split("\n")
    assert lines[0].startswith("downloading") and lines[2] == f"cached {server.url}/a.tar.gz at {path}"
    # Every redraw returns to the start of the same line: several states, one line.
    redraws = lines[1].split("\r")[1:]
    assert len(redraws) >= 3 and redraws[-1].startswith("  5.2 / 5.2 MB  100 %")


def test_a_body_cut_short_is_an_error_and_never_cached(server, tmp_path):
    server.files["/a.tar.gz"] = bytes(3 << 20)
    server.truncated.add("/a.tar.gz")
    with pytest.raises(DataError, match=r"closed after 1572864 of 3145728 bytes"):
        cifar10._download(server.url + "/a.tar.gz", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- fetch-data ---------------------------------------------------------------------------


def test_fetch_data_downloads_once_and_prints_what_train_would_load(canonical, tmp_path, capsys):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    code, out, err = fetch_data(capsys, "--set", cache)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["source"] == "cifar10" and summary["uri"] == cifar10.CANONICAL_URL
    assert (summary["train"], summary["test"]) == (300, 200)
    assert "100 %" in err and "cached " in err

    # The checksum is the one training records for the same data.
    from job import sources
    from job.config import load_config

    cfg = load_config(None, ["data.source=cifar10", cache, "data.validation_size=0"])
    assert summary["checksum"] == sources.load(cfg).checksum

    again = fetch_data(capsys, "--set", cache)
    assert again[0] == 0 and json.loads(again[1]) == summary and "downloading" not in again[2]
    assert canonical.requests == 1


def test_fetch_data_to_s3_stores_the_archive_once(canonical, s3, tmp_path, capsys):
    to = f"s3://{s3}/data/cifar-10-binary.tar.gz"
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path / 'a'}", "--to", to)
    assert code == 0, err
    first = json.loads(out)
    assert f"stored {cifar10.CANONICAL_URL} at {to}" in err
    stored = boto3.client("s3").get_object(Bucket=s3, Key="data/cifar-10-binary.tar.gz")["Body"].read()
    assert stored == REAL_SMALL.read_bytes()

    # Another machine (an empty cache) finds it there: no request to the origin, nothing sent.
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path / 'b'}", "--to", to)
    assert (code, out) == (0, "") and f"{to} already holds an object: nothing downloaded or uploaded" in err
    assert canonical.requests == 1 and not (tmp_path / "b").exists()

    # What a job configured with data.uri at the store then reads is the same data.
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", f"data.uri={to}")
    assert code == 0, err
    assert json.loads(out) == {**first, "uri": to}


def test_fetch_data_to_a_local_path(canonical, tmp_path, capsys):
    to = tmp_path / "store" / "cifar.tar.gz"
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path / 'cache'}", "--to", str(to))
    assert code == 0, err
    assert to.read_bytes() == REAL_SMALL.read_bytes()
    assert [p.name for p in to.parent.iterdir()] == ["cifar.tar.gz"]  # no temporary file left beside it


def test_upload_goes_up_in_parts(s3, tmp_path):
    from job import storage

    big = tmp_path / "big.tar.gz"
    big.write_bytes(bytes(range(256)) * (80 << 12))  # 20 MiB: above boto3's 8 MiB multipart threshold
    uri = f"s3://{s3}/data/big.tar.gz"
    storage.backend(uri).upload_file(big, uri)
    head = boto3.client("s3").head_object(Bucket=s3, Key="data/big.tar.gz")
    assert head["ContentLength"] == big.stat().st_size
    assert re.search(r"-\d+\"?$", head["ETag"])  # a multipart upload's ETag ends in its part count
    assert storage.backend(uri).exists(uri) and not storage.backend(uri).exists(uri + ".other")


@pytest.mark.parametrize("args, needle", [
    (["--set", "data.source=synthetic"], "data.source is synthetic"),
    (["--set", "data.source=folder", "--set", "data.uri=DIR"], "data.source is folder"),
    (["--set", "data.uri=DIR"], "is a directory"),
    (["--to", "s3://bucket"], "names a bucket"),
])
def test_to_without_a_single_archive_exits_2_before_fetching(canonical, tmp_path, capsys, args, needle):
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path / 'cache'}", "--to",
                                str(tmp_path / "store.tar.gz"), *args)
    assert code == 2 and out == "" and needle in err, err
    assert canonical.requests == 0 and not (tmp_path / "store.tar.gz").exists()


def test_a_corrupt_archive_exits_3_and_is_not_stored(server, tmp_path, capsys):
    server.files["/cifar.tar.gz"] = REAL_SMALL.read_bytes()[:-5000]
    to = tmp_path / "store.tar.gz"
    code, out, err = fetch_data(capsys, "--set", f"data.uri={server.url}/cifar.tar.gz",
                                "--set", f"data.cache_dir={tmp_path / 'cache'}", "--to", str(to))
    assert code == 3 and out == ""
    assert re.search(r"cifar-job: error: .*cifar\.tar\.gz", err), err
    assert not to.exists()


def test_a_checksum_mismatch_exits_3(canonical, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cifar10, "CANONICAL_MD5", "0" * 32)
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 3 and "checksum mismatch for " + cifar10.CANONICAL_URL in err


def test_a_missing_bucket_exits_4_naming_it(s3, canonical, tmp_path, capsys):
    uri = f"s3://{s3}-missing/data/cifar.tar.gz"
    code, out, err = fetch_data(capsys, "--set", f"data.uri={uri}", "--set", f"data.cache_dir={tmp_path}")
    assert code == 4 and uri in err, err
    # As a destination: refused before 160 MB are downloaded for nothing.
    code, out, err = fetch_data(capsys, "--set", f"data.cache_dir={tmp_path}", "--to", uri)
    assert code == 4 and uri in err and "NoSuchBucket" in err, err
    assert canonical.requests == 0


def test_an_s3_prefix_reads_like_train_but_is_no_archive_to_store(s3, tmp_path, capsys):
    client = boto3.client("s3")
    with tarfile.open(REAL_SMALL) as tar:
        for member in tar.getmembers():
            if member.isfile():
                client.put_object(Bucket=s3, Key=f"cifar/{member.name}", Body=tar.extractfile(member).read())
    prefix = f"s3://{s3}/cifar"
    code, out, err = fetch_data(capsys, "--set", f"data.uri={prefix}", "--set", f"data.cache_dir={tmp_path / 'a'}")
    assert code == 0, err
    assert json.loads(out)["train"] == 300

    code, out, err = fetch_data(capsys, "--set", f"data.uri={prefix}", "--set", f"data.cache_dir={tmp_path / 'b'}",
                                "--to", str(tmp_path / "store.tar.gz"))
    assert code == 2 and f"data.uri {prefix} is a prefix of several objects" in err, err
    assert not (tmp_path / "store.tar.gz").exists()

    # Nothing under the URI: a data error naming it, as train reports it.
    missing = f"s3://{s3}/nothing-here.tar.gz"
    code, out, err = fetch_data(capsys, "--set", f"data.uri={missing}", "--set", f"data.cache_dir={tmp_path / 'c'}")
    assert code == 3 and missing in err, err


def test_synthetic_data_is_summarised_too(tmp_path, capsys):
    code, out, err = fetch_data(capsys, "--set", "data.source=synthetic", "--set", "data.synthetic.train_size=300",
                                "--set", "data.synthetic.test_size=50", "--set", "data.validation_size=20")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["source"], summary["uri"], summary["train"], summary["test"]) == ("synthetic", None, 300, 50)
    assert summary["checksum"].startswith("sha256:")


def test_fetch_data_as_a_process_needs_no_tensorflow(server, tmp_path):
    server.files["/cifar.tar.gz"] = REAL_SMALL.read_bytes()
    proc = cli(tmp_path, "fetch-data", "--set", "data.source=cifar10", "--set", f"data.uri={server.url}/cifar.tar.gz",
               "--set", f"data.cache_dir={tmp_path / 'cache'}", env=clean_env(), python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "job" in imported and "tensorflow" not in imported
    assert json.loads(proc.stdout)["train"] == 300


def test_the_k8s_job_stores_the_archive_where_its_training_reads_it(tmp_path):
    (job,) = yaml.safe_load_all((Path(__file__).parents[1] / "infra" / "k8s" / "train-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (init,), (train,) = pod["initContainers"], pod["containers"]
    assert init["image"] == train["image"] and init["args"][0] == "fetch-data"
    args = init["args"][1:]
    to = args.pop(args.index("--to") + 1)
    args.remove("--to")
    resolved = [yaml.safe_load(cli(Path(__file__).parents[1], "check-config", *a).stdout)["data"]
                for a in (args, train["args"][1:])]
    assert resolved[0]["source"] == "cifar10" and resolved[0]["uri"] is None  # the canonical archive
    assert resolved[1]["uri"] == to
