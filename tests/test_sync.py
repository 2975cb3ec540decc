"""`cifar-serve sync`: complete versions only, each appearing whole."""

import subprocess
import sys

import boto3
import pytest

from helpers import WEIGHTS, garbage_graph, pixels, publish_copy, republish
from job import export, model
from serve.sync import sync_once

PIXELS = pixels(2)


@pytest.mark.slow
def test_local_versions_are_copied_once_and_whole(tmp_path):
    net = model.build("simple_cnn")
    export.export(net, str(tmp_path / "export"), "cifar10", {}, PIXELS)
    (tmp_path / "export" / "cifar10" / ".staging-x").mkdir()  # an export in progress
    dest = tmp_path / "tfserving" / "cifar10"
    assert sync_once(str(tmp_path / "export" / "cifar10"), dest) == [1]
    assert (dest / "1" / "saved_model.pb").is_file() and (tmp_path / "export" / "cifar10" / "1").is_dir()
    export.export(net, str(tmp_path / "export"), "cifar10", {}, PIXELS)
    assert sync_once(str(tmp_path / "export" / "cifar10"), dest) == [2]
    assert sorted(p.name for p in dest.iterdir()) == ["1", "2"]


@pytest.mark.slow
def test_s3_versions_without_their_marker_are_left_alone(s3, tmp_path):
    export.export(model.build("simple_cnn"), f"s3://{s3}/models", "cifar10", {}, PIXELS)
    boto3.client("s3").put_object(Bucket=s3, Key="models/cifar10/2/saved_model.pb", Body=b"half")
    dest = tmp_path / "models" / "cifar10"
    done = subprocess.run([sys.executable, "-m", "serve", "sync", "--from", f"s3://{s3}/models/cifar10",
                           "--to", str(dest), "--once"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["1"]
    assert (dest / "1" / "variables").is_dir()


@pytest.mark.slow
def test_a_damaged_s3_version_is_refused_by_name_and_newer_ones_still_sync(s3, tmp_path):
    export.export(model.build("simple_cnn"), f"s3://{s3}/src", "cifar10", {}, PIXELS)
    republish(s3, "src/cifar10/1", "models/cifar10/1")
    republish(s3, "src/cifar10/1", "models/cifar10/2", damage={WEIGHTS: b"other bytes"})
    republish(s3, "src/cifar10/1", "models/cifar10/3")
    dest = tmp_path / "models" / "cifar10"
    done = subprocess.run([sys.executable, "-m", "serve", "sync", "--from", f"s3://{s3}/models/cifar10",
                           "--to", str(dest), "--once"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 4 and f"s3://{s3}/models/cifar10/2/{WEIGHTS} is corrupt" in done.stderr
    # TF Serving sees only whole, checked versions; nothing of 2 is left half-way.
    assert sorted(p.name for p in dest.iterdir()) == ["1", "3"]
    assert (dest / "3" / WEIGHTS).is_file()


@pytest.mark.slow
def test_a_corrupt_local_version_is_refused_once_and_newer_ones_still_sync(tmp_path, exported_model, caplog):
    from serve import store

    source = tmp_path / "export" / "cifar10"
    publish_copy(source, exported_model, garbage_graph)
    publish_copy(source, exported_model)
    dest = tmp_path / "tfserving" / "cifar10"
    refused = {}
    with pytest.raises(store.VersionError, match="cannot be loaded: DecodeError"):
        sync_once(str(source), dest, refused=refused)
    assert sorted(p.name for p in dest.iterdir()) == ["2"]
    caplog.clear()
    assert sync_once(str(source), dest, refused=refused) == []  # remembered: neither loaded nor told again
    assert not caplog.records


@pytest.mark.slow
def test_sync_check_is_healthy_only_while_passes_reach_the_store(tmp_path):
    heartbeat = tmp_path / "heartbeat"

    def sync(*args):
        return subprocess.run([sys.executable, "-m", "serve", "sync", *args], capture_output=True, text=True,
                              timeout=120)

    never = sync("--check", str(heartbeat))
    assert never.returncode == 1 and "has not reached the store yet" in never.stderr
    ran = sync("--from", str(tmp_path / "models" / "cifar10"), "--to", str(tmp_path / "out"), "--once",
               "--heartbeat", str(heartbeat))
    assert ran.returncode == 0, ran.stderr
    assert sync("--check", str(heartbeat), "--max-age", "60").returncode == 0
    assert sync("--check", str(heartbeat), "--max-age", "0").returncode == 1
    assert sync("--to", str(tmp_path)).returncode == 2  # neither --from nor --check
