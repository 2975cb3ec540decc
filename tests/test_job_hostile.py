"""The training job against careless and hostile inputs (issue 28): a presigned
data URL or an endpoint with a password never leaves the process, an archive
cannot make the job read more than CIFAR-10 can hold, and a config cannot crash
or hang it. Each fails with its documented exit code and one line naming what
is wrong, never a traceback."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tarfile
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REAL_SMALL, clean_env, free_port, pixels, png
from job.cli import main
from job.errors import ConfigError
from job.image_folder import load_image_folder

pytestmark = pytest.mark.usefixtures("no_cifar_env")

CREDENTIAL = "AKIAHOSTILE28EXAMPLE"
SIGNATURE = "deadbeef" * 8
ENDPOINT_SECRET = "SECRETXYZ"
SECRETS = (CREDENTIAL, SIGNATURE, ENDPOINT_SECRET)


def presigned(base: str, signature: str = SIGNATURE) -> str:
    """A URL shaped like S3's presigned GETs, with its signing parameters among the others."""
    return (f"{base}/cifar.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CREDENTIAL}%2F20261208%2F"
            f"us-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261208T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature={signature}")


def served(server, url: str) -> str:
    """`url` answered by the local server with the 500 real images; ArchiveServer matches the path and query."""
    server.files[url.removeprefix(server.url)] = REAL_SMALL.read_bytes()
    return url


def assert_hidden(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text


def assert_hidden_under(*folders: Path) -> None:
    """No file name and no file's bytes under `folders` hold a secret."""
    for folder in folders:
        for path in folder.rglob("*"):
            assert_hidden(str(path.relative_to(folder)))
            if path.is_file():
                body = path.read_bytes()
                assert not any(secret.encode() in body for secret in SECRETS), path


def run_capped(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60,
               memory: int = 1 << 30) -> subprocess.CompletedProcess:
    """`cifar-job ARGS` in a subprocess refused more than `memory` bytes of address space and killed after
    `timeout`: a fault under test fails the test (exit 1 on a MemoryError, TimeoutExpired), not the machine.
    (A peak RSS would not do: a forked child's ru_maxrss starts at this process's, TensorFlow and all.)"""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "job", *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap)


# --- presigned URLs and endpoints with a password: never shown, never stored ----------------------


def test_check_config_hides_a_presigned_url(capsys):
    url = presigned("https://bucket.s3.amazonaws.com")
    for extra in ([], ["--explain"]):
        assert main(["check-config", "--set", "data.source=cifar10", "--set", f"data.uri={url}", *extra]) == 0
        out, err = capsys.readouterr()
        assert_hidden(out, err)
        assert "X-Amz-Signature=***" in out and "X-Amz-Expires=3600" in out


def test_submit_dry_run_hides_a_presigned_url_and_submit_carries_it(tmp_path, capsys):
    from job import submit
    from job.config import load_config

    url = presigned("https://bucket.s3.amazonaws.com")
    sets = ["data.source=cifar10", f"data.uri={url}", "checkpoint.uri=s3://bkt/c", "export.uri=s3://bkt/e"]
    assert main(["submit", "aws-batch", "--job-queue", "q", "--image", "img:1", "--dry-run",
                 *(a for s in sets for a in ("--set", s))]) == 0
    out, err = capsys.readouterr()
    assert_hidden(out, err)
    assert "data.uri=https://bucket.s3.amazonaws.com/cifar.tar.gz?" in out
    # What is submitted is the job's real data: only what is shown is redacted.
    opts = submit.BatchOptions(job_queue="q", image="img:1")
    command = submit.submit_request(load_config(None, sets, platform=False), opts, "jd")["containerOverrides"]
    assert f"data.uri={url}" in command["command"]


def test_fetch_data_hides_a_presigned_url_in_its_output_and_cache(server, tmp_path, capsys):
    url = served(server, presigned(server.url))
    cache = tmp_path / "cache"
    code = main(["fetch-data", "--set", "data.source=cifar10", "--set", f"data.uri={url}",
                 "--set", f"data.cache_dir={cache}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["train"] == 300 and "downloading" in err and "cached" in err
    assert_hidden(out, err)
    assert [p.name.split("-", 1)[1] for p in cache.iterdir()] == ["cifar.tar.gz"]
    assert_hidden_under(cache)


def test_a_download_error_hides_a_presigned_url(server, tmp_path, capsys):
    url = presigned(server.url)  # not served: 404
    for debug in ([], ["--debug"]):
        code = main(["fetch-data", "--set", "data.source=cifar10", "--set", f"data.uri={url}",
                     "--set", f"data.cache_dir={tmp_path}", *debug])
        out, err = capsys.readouterr()
        assert code == 3 and "404" in err and f"{server.url}/cifar.tar.gz?" in err
        assert_hidden(out, err)
    assert ("Traceback" in err) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, uri", [
    (["fetch-data", "--set", "data.source=cifar10", "--set", "data.uri=s3://bkt/cifar.tar.gz"], "s3://bkt/cifar.tar.gz"),
    pytest.param(["train", "--set", "checkpoint.uri=s3://bkt/ckpt", "--set", "export.uri=s3://bkt/export"],
                 "s3://bkt/ckpt", marks=pytest.mark.slow),
])
def test_a_storage_error_hides_the_endpoints_password(tmp_path, args, uri):
    endpoint = f"http://KEY:{ENDPOINT_SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    env = clean_env(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="testing-key", AWS_SECRET_ACCESS_KEY="x",
                    AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1", AWS_CONFIG_FILE=os.devnull,
                    AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    done = run_capped([*args, "--set", f"data.cache_dir={tmp_path / 'cache'}"], tmp_path, env, timeout=120,
                      memory=4 << 30)
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == 4, err
    assert uri in err and "127.0.0.1" in err and "Traceback" not in err
    assert_hidden(out, err)


@pytest.fixture(scope="module")
def presigned_runs(tmp_path_factory):
    """A run trained on a presigned URL (plain log), then resumed with a freshly signed one (JSON log)."""
    import threading

    from helpers import ArchiveServer

    tmp = tmp_path_factory.mktemp("presigned")
    server = ArchiveServer()
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    sets = ["data.source=cifar10", "data.validation_size=50", "train.batch_size=32", f"data.cache_dir={tmp / 'cache'}",
            "checkpoint.every_steps=4", f"checkpoint.uri={tmp / 'ckpt'}", f"export.uri={tmp / 'export'}"]
    runs = []
    for epochs, signature, fmt in ((1, SIGNATURE, "text"), (2, "feedface" * 8, "json")):
        url = served(server, presigned(server.url, signature))
        args = ["train", "--log-format", fmt, *(a for s in [*sets, f"data.uri={url}", f"train.epochs={epochs}"]
                                               for a in ("--set", s))]
        runs.append(subprocess.run([sys.executable, "-m", "job", *args], cwd=tmp, env=clean_env(),
                                   capture_output=True, text=True, timeout=600))
    server.shutdown()
    server.server_close()
    return tmp, runs


def test_a_crash_that_is_no_job_error_prints_its_traceback_redacted(tmp_path):
    # Not one of the job's own errors (those print one line): Python's traceback, which quotes the
    # exception's message, and with it any URL the message holds.
    crash = (f"import sys\nfrom job import cli\n"
             f"def crash(args):\n    raise RuntimeError('cannot open {presigned('https://b.s3.amazonaws.com')}')\n"
             f"cli._dispatch = crash\nsys.exit(cli.main(['check-config']))\n")
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120,
                          env=clean_env(), cwd=tmp_path)
    assert done.returncode == 1
    assert "RuntimeError: cannot open https://b.s3.amazonaws.com/cifar.tar.gz?" in done.stderr
    assert not [s for s in SECRETS if s in done.stderr]


@pytest.mark.slow
def test_training_logs_hide_a_presigned_url(presigned_runs):
    _, (first, second) = presigned_runs
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "resolved config" in first.stdout and "X-Amz-Signature=***" in first.stdout
    events = [json.loads(line) for line in second.stdout.splitlines()]
    assert events[0]["config"]["data"]["uri"].endswith("X-Amz-Signature=***")
    for run in (first, second):
        assert_hidden(run.stdout, run.stderr)


@pytest.mark.slow
def test_a_run_resumes_under_a_freshly_signed_url(presigned_runs):
    tmp, (first, second) = presigned_runs
    assert first.returncode == second.returncode == 0, second.stderr
    assert "resum" in second.stdout
    latest = json.loads((tmp / "ckpt" / "latest.json").read_text())
    assert latest["finished"] and latest["step"] == 2 * latest["steps_per_epoch"]


@pytest.mark.slow
def test_the_saved_config_and_model_card_hide_a_presigned_url(presigned_runs):
    tmp, _ = presigned_runs
    saved = yaml.safe_load((tmp / "ckpt" / "config.yaml").read_text())
    assert saved["data"]["uri"].endswith("X-Amz-Signature=***")
    cards = sorted((tmp / "export").rglob("model_card.json"))
    assert len(cards) == 2  # each run exported a version
    for card in cards:
        card = json.loads(card.read_text())
        assert card["config"]["data"]["uri"].endswith("X-Amz-Signature=***")
        assert card["lineage"]["data"]["uri"].endswith("X-Amz-Signature=***")  # where the version's data came from
    assert_hidden_under(tmp / "ckpt", tmp / "export", tmp / "cache")


# --- archives: members bounded by what CIFAR-10 can hold, checked before they are read ----------


def sparse_tar(path: Path, name: str, size: int) -> Path:
    """A .tar.gz of a few hundred bytes whose one member, a sparse file of zeros, expands to `size` bytes."""
    buf = BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        sparse_map = b"1\n0\n0\n".ljust(512, b"\0")  # one region of no bytes: the rest is a hole
        info = tarfile.TarInfo(f"GNUSparseFile.0/{Path(name).name}")
        info.size = len(sparse_map)
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                            "GNU.sparse.realsize": str(size)}
        tar.addfile(info, BytesIO(sparse_map))
    path.write_bytes(buf.getvalue())
    return path


def zipped_zeros(path: Path, name: str, size: int) -> Path:
    """A .zip whose one entry is `size` zero bytes, deflated about a thousandfold."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(name, "w") as entry:
        for _ in range(size >> 20):
            entry.write(bytes(1 << 20))
    return path


@pytest.mark.parametrize("source, member, size", [
    ("cifar10", "cifar-10-batches-bin/data_batch_1.bin", 1_200_000_000),
    ("cifar10", "cifar-10-batches-py/test_batch", 1_200_000_000),
    ("folder", "train/cat/1.png", 1_200_000_000),
    ("folder", "train/cat/1.png", 65 << 20),  # a zip entry, just over the bound
])
def test_an_archive_member_larger_than_the_data_can_be_exits_3_unread(tmp_path, source, member, size):
    if size > 1 << 30:
        archive = sparse_tar(tmp_path / "bomb.tar.gz", member, size)
        assert archive.stat().st_size < 400
    else:
        archive = zipped_zeros(tmp_path / "bomb.zip", member, size)
    # Within 1 GiB of address space: reading the member would take more, and end in a MemoryError.
    done = run_capped(["fetch-data", "--set", f"data.source={source}", "--set", f"data.uri={archive}"], tmp_path)
    assert done.returncode == 3, done.stderr
    assert member in done.stderr and f"is {size} bytes" in done.stderr and "Traceback" not in done.stderr


# --- config files and --set values that would crash or hang the job ------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "large"])
def test_a_config_that_is_no_regular_file_of_at_most_1_mib_exits_2(tmp_path, kind):
    if kind == "device":
        path = Path("/dev/zero")
    elif kind == "fifo":
        path = tmp_path / "config.yaml"
        os.mkfifo(path)  # nothing will ever write to it
    elif kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "config.yaml"
        path.write_text("#" * (2 << 20) + "\nseed: 1\n")
    done = run_capped(["check-config", "--config", str(path)], tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr and done.stdout == ""
    assert ("regular file" if kind != "large" else "1 MiB") in done.stderr


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("where", ["file", "set", "key"])
def test_yaml_nested_too_deep_exits_2(tmp_path, where):
    value = deep(50_000)  # a --set value is one argument, at most 128 KiB
    if where == "file":
        (tmp_path / "config.yaml").write_text(f"seed: {value}\n")
        args = ["check-config", "--config", str(tmp_path / "config.yaml")]
    elif where == "set":
        args = ["check-config", "--set", f"seed={value}"]
    else:  # two dotted keys 20,000 levels deep, merged
        key = ".".join(["a"] * 20_000)
        args = ["check-config", "--set", f"{key}.x=1", "--set", f"{key}.y=2"]
    done = run_capped(args, tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "nested deeper than" in done.stderr and "Traceback" not in done.stderr and len(done.stderr) < 1000


def test_reasonable_nesting_still_loads(tmp_path):
    from job.config import load_config, read_yaml

    (tmp_path / "config.yaml").write_text("train:\n  lr_schedule:\n    name: cosine\n    warmup_epochs: 1\n")
    assert read_yaml(tmp_path / "config.yaml")["train"]["lr_schedule"]["name"] == "cosine"
    # Eight levels are within the limit: the value is refused by its type, not by its depth.
    with pytest.raises(ConfigError, match="train.epochs: Input should be a valid integer"):
        load_config(None, [f"train.epochs={deep(8)}"])


@pytest.mark.parametrize("text, needle", [
    ('seed: !!python/object/apply:os.system ["echo hi"]\n', "python/object"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nseed: *g\n", "Extra inputs are not permitted"),
])
def test_objects_and_alias_bombs_are_still_refused(tmp_path, capsys, text, needle):
    (tmp_path / "config.yaml").write_text(text)
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err) < 2000


@pytest.mark.parametrize("value", ["-1", str(2**32)])
def test_a_seed_out_of_range_exits_2_naming_it(capsys, value):
    assert main(["check-config", "--set", f"seed={value}"]) == 2
    assert "seed:" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["data.synthetic.train_size", "data.synthetic.test_size"])
def test_a_synthetic_set_larger_than_cifar10_exits_2_naming_it(capsys, key):
    # 10**12 examples went on to a MemoryError (exit 1) at the first allocation.
    assert main(["check-config", "--set", f"{key}=1000000000000"]) == 2
    assert f"{key}: Input should be less than or equal to 60000" in capsys.readouterr().err


@pytest.mark.parametrize("variables, needle", [
    ({"CIFAR_TRAIN": deep(50_000)}, "invalid environment override (CIFAR_*)"),
    ({"SM_MODEL_DIR": "/m", "SM_HPS": '{"train.epochs": ' + deep(50_000) + "}"}, "SageMaker hyperparameters"),
])
def test_json_in_the_environment_nested_too_deep_exits_2(capsys, monkeypatch, variables, needle):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


# --- archive members that point elsewhere: read from memory, never written ---------------------


def test_archive_members_with_dot_dot_absolute_paths_or_links_write_nothing_and_read_no_target(tmp_path):
    classes = [f"c{i}" for i in range(10)]
    archive = tmp_path / "work" / "folders.tar.gz"
    archive.parent.mkdir()
    secret = tmp_path / "outside.png"  # what a link points at: must never be read into the data
    secret.write_bytes(png(pixels(1, seed=99)[0]))
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for i, name in enumerate(classes):
                data = png(pixels(1, seed=i)[0])
                info = tarfile.TarInfo(f"{split}/{name}/{i}.png")
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
        for name, kind in (("train/c0/sym.png", tarfile.SYMTYPE), ("train/c1/hard.png", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, str(secret)
            tar.addfile(link)
        for name in ("../escape/train/c0/x.png", str(tmp_path / "abs" / "train" / "c0" / "y.png")):
            data = png(pixels(1, seed=98)[0])
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    (images, labels), _, names = load_image_folder(archive)
    # Only the ten regular members under train/: neither a link's target nor a member outside the root.
    assert names == tuple(classes)
    assert [img.tolist() for img in images[np.argsort(labels)]] == [pixels(1, seed=i)[0].tolist() for i in range(10)]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
