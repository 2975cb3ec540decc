"""SageMaker's endpoint contract: `GET /ping`, `POST /invocations` (chosen by
Content-Type), the container started as `IMAGE serve`, and the model read
from /opt/ml/model, laid out as the job exports it there."""

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import pixels, png, wait_until
from serve import cli
from serve import settings as settings_module
from serve.settings import Settings

PIXELS = pixels(3, seed=5)


@pytest.fixture(scope="module")
def export_root(exported_model):
    """What a job run on SageMaker leaves in SM_MODEL_DIR: `<export.uri>/cifar10/1/`."""
    return exported_model.parent


@pytest.fixture
def sagemaker_dir(monkeypatch, tmp_path):
    """/opt/ml/model stands in as an empty folder here, and no SERVE_MODEL_URI is set."""
    root = tmp_path / "model"
    root.mkdir()
    monkeypatch.setattr(settings_module, "SAGEMAKER_MODEL_DIR", root)
    monkeypatch.delenv("SERVE_MODEL_URI", raising=False)
    return root


def test_ping_is_503_until_a_model_loads_then_200(sagemaker_dir, export_root, tmp_path, make_app):
    c = make_app(Settings(poll_seconds=0.1)).test_client()
    assert c.get("/ping").status_code == 503
    assert c.get("/healthz").status_code == 200  # alive, only not ready
    # A bare version appears whole, as an unpacked archive packed by hand would hold it.
    shutil.copytree(export_root / "cifar10" / "1", tmp_path / "staging")
    (tmp_path / "staging").rename(sagemaker_dir / "1")
    wait_until(lambda: c.get("/ping").status_code == 200)
    predicted = c.post("/invocations", data=png(PIXELS[0]), content_type="image/png")
    assert predicted.status_code == 200 and predicted.json["model_version"] == 1


def test_invocations_with_json_answers_as_tf_serving_predict(client, export_root):
    body = {"instances": PIXELS.tolist()}
    answer = client.post("/invocations", json=body)
    assert answer.status_code == 200
    assert answer.json == client.post("/v1/models/cifar10:predict", json=body).json
    signature = tf.saved_model.load(str(export_root / "cifar10" / "1")).signatures["serving_default"]
    expected = signature(images=tf.constant(PIXELS))["probabilities"].numpy()
    got = np.array([p["probabilities"] for p in answer.json["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Charset parameters are still JSON; a malformed body is the predict route's 400.
    assert client.post("/invocations", data=b'{"instances": [[1]]}',
                       content_type="application/json; charset=utf-8").status_code == 400


@pytest.mark.parametrize("content_type, encode", [("image/png", "PNG"), ("image/jpeg", "JPEG")])
def test_invocations_with_an_image_answers_as_predict(client, content_type, encode):
    out = io.BytesIO()
    Image.fromarray(PIXELS[1]).resize((96, 64)).save(out, format=encode)
    answer = client.post("/invocations", data=out.getvalue(), content_type=content_type)
    assert answer.status_code == 200
    assert answer.json == client.post("/predict", data=out.getvalue(), content_type=content_type).json
    assert len(answer.json["predictions"]) == 5


@pytest.mark.parametrize("content_type", ["text/csv", "application/x-npy", None])
def test_invocations_with_another_content_type_is_415(client, content_type):
    answer = client.post("/invocations", data=b"1,2,3", content_type=content_type)
    assert answer.status_code == 415
    assert "Content-Type" in answer.json["error"]


def test_an_image_that_does_not_decode_is_a_400(client):
    answer = client.post("/invocations", data=b"not a png", content_type="image/png")
    assert answer.status_code == 400 and "not a PNG or JPEG" in answer.json["error"]


def test_invocations_needs_the_api_key_when_keys_are_on(export_root, make_app):
    c = make_app(Settings(model_uri=str(export_root / "cifar10"), api_keys=["k1"], poll_seconds=0.2)).test_client()
    wait_until(lambda: c.get("/ping").status_code == 200)  # the health check stays open
    assert c.post("/invocations", json={"instances": PIXELS[:1].tolist()}).status_code == 401
    answer = c.post("/invocations", json={"instances": PIXELS[:1].tolist()}, headers={"X-API-Key": "k1"})
    assert answer.status_code == 200


def test_the_jobs_export_in_sagemakers_model_dir_is_served(sagemaker_dir, export_root, make_app):
    assert Settings().model_uri == str(sagemaker_dir)  # empty: bare versions may still come
    shutil.copytree(export_root / "cifar10", sagemaker_dir / "cifar10")
    settings = Settings(poll_seconds=0.2)
    # The job's layout: the one model base inside, and its name in the routes.
    assert settings.model_uri == str(sagemaker_dir / "cifar10") and settings.name == "cifar10"
    c = make_app(settings).test_client()
    wait_until(lambda: c.get("/ping").status_code == 200)
    assert c.post("/invocations", json={"instances": PIXELS[:1].tolist()}).status_code == 200
    assert Settings(model_uri="s3://b/other").model_uri == "s3://b/other"  # an explicit URI wins


def test_no_sagemaker_dir_and_no_uri_leaves_the_uri_unset(monkeypatch, tmp_path):
    monkeypatch.setattr(settings_module, "SAGEMAKER_MODEL_DIR", tmp_path / "absent")
    monkeypatch.delenv("SERVE_MODEL_URI", raising=False)
    assert Settings().model_uri is None


def test_serve_as_first_argument_is_accepted(monkeypatch, capsys):
    # main() writes flags into the environment; registering them first lets monkeypatch restore them.
    for name in ("SERVE_PORT", "SERVE_MODEL_URI"):
        monkeypatch.setenv(name, os.environ.get(name, "x"))
    # The flags after `serve` are parsed as the service's own: here a port out of range, refused by the settings.
    assert cli.main(["serve", "--model-uri", "/m/cifar10", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "SERVE_PORT" in err and "unrecognized" not in err
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0 and "--model-uri" in capsys.readouterr().out
