"""The export layout (common/layout.py) holds the job's writing side and the
service's reading side to one contract: an export the job publishes, locally
or on S3, is found, downloaded, checked and labelled by the service through
the same names."""

import json

import boto3
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from common import layout
from helpers import pixels
from job import export, model
from serve import checks, store

PROBE = pixels(4, seed=2)
NAMES = tuple(f"class {i}" for i in range(10))  # a space in each: one name per line, as written


@pytest.fixture(scope="module")
def net():
    return model.build("simple_cnn")


def test_an_export_has_every_file_and_name_the_layout_promises(tmp_path, net):
    version, uri = export.export(net, str(tmp_path), "cifar10", {"test_accuracy": 0.5}, PROBE, NAMES)
    root = tmp_path / "cifar10" / str(version)
    for rel in (layout.LABELS, layout.CARD, layout.PROBE_IMAGES, layout.PROBE_OUTPUTS, layout.WARMUP):
        assert (root / rel).is_file(), rel
    assert layout.labels(root) == NAMES
    assert json.loads((root / layout.CARD).read_text())["test_accuracy"] == 0.5
    saved = saved_model_pb2.SavedModel.FromString((root / "saved_model.pb").read_bytes())
    signatures = saved.meta_graphs[0].signature_def
    assert set(signatures[layout.SIGNATURE].inputs) == {layout.INPUT}
    assert set(signatures[layout.SIGNATURE].outputs) == {layout.PROBABILITIES, layout.CLASS_ID, layout.LABEL}
    assert set(signatures[layout.BYTES_SIGNATURE].inputs) == {layout.BYTES_INPUT}
    # The reading side finds it and passes its own checks on it.
    assert store.versions(str(tmp_path / "cifar10")) == [version]
    served = tf.saved_model.load(str(root)).signatures[layout.SIGNATURE]
    assert checks.check(root, served) is True


def test_a_version_published_on_s3_is_read_back_through_its_manifest(s3, tmp_path, net):
    base = f"s3://{s3}/models/cifar10"
    version, uri = export.export(net, f"s3://{s3}/models", "cifar10", {}, PROBE)
    assert store.versions(base) == [version]
    local = store.local_path(base, version, str(tmp_path / "cache"))
    marker = boto3.client("s3").get_object(Bucket=s3, Key=f"models/cifar10/{version}/{layout.MARKER}")["Body"].read()
    listed = layout.read_manifest(marker, uri)
    assert sorted(listed) == sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert layout.labels(local) == layout.CIFAR10_CLASSES


def test_a_manifest_is_refused_when_it_is_not_one_or_points_outside(tmp_path):
    for body in (b"not json", b"[]", b'{"a": 1}'):
        with pytest.raises(layout.LayoutError, match="not a manifest"):
            layout.read_manifest(body, "s3://b/v")
    with pytest.raises(layout.LayoutError, match="not a file inside"):
        layout.read_manifest(b'{"../escape": "00"}', "s3://b/v")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(layout.LayoutError, match="corrupt"):
        layout.check_file(tmp_path / "f", "0" * 64, "s3://b/v/f")
