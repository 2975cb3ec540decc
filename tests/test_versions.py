"""Rollouts: a version is served only if its answers on the export's probe
batch match the record, its test accuracy clears SERVE_MIN_ACCURACY, and it
is the pinned one when SERVE_MODEL_VERSION is set; `cifar-serve sync`
mirrors only the versions the service would serve."""

import re
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import pixels, publish, wait_until
from job import model
from serve import store
from serve.settings import Settings
from serve.sync import sync_once

PROBE = pixels(8, seed=3)


@pytest.fixture(scope="module")
def net():
    return model.build("simple_cnn")


@pytest.fixture
def client_for(make_app):
    """A test client of an app serving `base`, with `settings`; the app is closed after the test."""
    return lambda base, **settings: make_app(Settings(model_uri=str(base), poll_seconds=0.1, **settings)).test_client()


def refused(client, reason):
    text = client.get("/metrics").get_data(as_text=True)
    found = re.search(rf'cifar_serve_model_versions_refused_total{{reason="{reason}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_every_export_records_its_probe_batch_and_the_answers_to_it(tmp_path, net):
    version = publish(tmp_path / "cifar10", net, PROBE)
    extra = version / "assets.extra"
    np.testing.assert_array_equal(np.load(extra / "probe_images.npy"), PROBE)
    own = tf.saved_model.load(str(version)).signatures["serving_default"](images=tf.constant(PROBE))
    with np.load(extra / "probe_outputs.npz", allow_pickle=False) as record:
        assert set(record) == set(own)
        np.testing.assert_allclose(record["probabilities"], own["probabilities"].numpy(), atol=1e-6)


@pytest.mark.slow
def test_a_version_whose_answers_differ_is_refused_once_and_the_previous_keeps_serving(tmp_path, net, client_for):
    base = tmp_path / "cifar10"
    publish(base, net, PROBE)
    client = client_for(base)
    wait_until(lambda: client.get("/readyz").status_code == 200)
    before = refused(client, "probe")
    publish(base, net, PROBE, tamper=True)
    wait_until(lambda: refused(client, "probe") == before + 1)
    time.sleep(1)  # ten more polls: the refusal is remembered, not repeated
    assert refused(client, "probe") == before + 1
    answer = client.post("/v1/models/cifar10:predict", json={"instances": PROBE[:1].tolist()})
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"
    # A fixed version 3 is served: the refusal held back only the version it was about.
    publish(base, net, PROBE)
    wait_until(lambda: client.get("/readyz").json.get("version") == 3)


@pytest.mark.slow
def test_a_version_below_min_accuracy_is_not_served(tmp_path, net, client_for):
    base = tmp_path / "cifar10"
    publish(base, net, PROBE, accuracy=0.9)
    publish(base, net, PROBE, accuracy=0.5)
    client = client_for(base, min_accuracy=0.8)
    before = refused(client, "accuracy")
    wait_until(lambda: client.get("/readyz").status_code == 200)
    assert client.get("/readyz").json["version"] == 1
    wait_until(lambda: refused(client, "accuracy") == before + 1)


@pytest.mark.slow
def test_a_pinned_version_is_served_while_a_newer_one_exists(tmp_path, net, client_for):
    base = tmp_path / "cifar10"
    publish(base, net, PROBE)
    publish(base, net, PROBE)
    client = client_for(base, model_version=1)
    wait_until(lambda: client.get("/readyz").status_code == 200)
    time.sleep(0.5)
    assert client.get("/readyz").json["version"] == 1
    absent = client_for(base, model_version=5)
    time.sleep(0.5)
    ready = absent.get("/readyz")
    assert ready.status_code == 503 and ready.json == {
        "status": "not ready", "model": "cifar10",
        "reason": "version 5 (SERVE_MODEL_VERSION) is not in the model store yet"}


@pytest.mark.slow
def test_sync_leaves_refused_versions_out_and_mirrors_unchecked_old_ones(tmp_path, net):
    base = tmp_path / "cifar10"
    publish(base, net, PROBE)
    publish(base, net, PROBE, tamper=True)
    publish(base, net, PROBE, accuracy=0.5)
    old = publish(base, net, PROBE)
    for name in ("probe_images.npy", "probe_outputs.npz"):  # as exports made before the record existed
        (old / "assets.extra" / name).unlink()
    dest = tmp_path / "tfserving" / "cifar10"
    with pytest.raises(store.VersionError, match="version|probe record"):
        sync_once(str(base), dest, min_accuracy=0.8)
    assert sorted(p.name for p in dest.iterdir()) == ["1", "4"]


@pytest.mark.slow
def test_withdrawing_the_served_version_rolls_back_to_the_warm_previous_one(tmp_path, net, client_for):
    base = tmp_path / "cifar10"
    publish(base, net, PROBE)
    client = client_for(base, keep_previous=True)
    backend = client.application.extensions["predictor"].backend
    wait_until(lambda: client.get("/readyz").status_code == 200)
    first = backend.status()
    publish(base, net, PROBE)
    wait_until(lambda: client.get("/readyz").json["version"] == 2)
    shutil.rmtree(base / "2")
    wait_until(lambda: client.get("/readyz").json["version"] == 1)
    assert backend.status() is first  # the same loaded model: nothing was loaded again
