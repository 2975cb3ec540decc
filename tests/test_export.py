"""The exported SavedModel: the only contract between the job and whatever serves it."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import pixels
from job import export, model, storage
from job.sources import CLASS_NAMES
from job.errors import JobError

PIXELS = pixels(5, seed=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    net = model.build("simple_cnn")
    card = {"step": 1, "test_accuracy": 0.5, "data_checksum": "sha256:x", "config": {"seed": 0}}
    version, uri = export.export(net, str(base), "cifar10", card, PIXELS)
    return net, base, version, uri


def encoded(image: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return out.getvalue()


def test_serving_default_takes_uint8_images_and_returns_probabilities(exported):
    _, _, version, uri = exported
    assert version == 1 and uri.endswith("cifar10/1")
    sig = tf.saved_model.load(uri).signatures["serving_default"]
    spec = sig.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 32, 32, 3]
    outputs = {k: (v.dtype, v.shape.as_list()) for k, v in sig.structured_outputs.items()}
    assert outputs == {"probabilities": (tf.float32, [None, 10]), "class_id": (tf.int64, [None]),
                       "label": (tf.string, [None])}


def test_both_signatures_answer_the_class_and_its_label_from_the_models_own_labels_file(exported):
    _, _, _, uri = exported
    loaded = tf.saved_model.load(uri)
    assert (Path(uri) / "assets" / "labels.txt").read_text().splitlines() == list(CLASS_NAMES)
    png = [encoded(img, "PNG") for img in PIXELS]
    for out in (loaded.signatures["serving_default"](images=tf.constant(PIXELS)),
                loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(png))):
        best = np.argmax(out["probabilities"].numpy(), axis=1)
        np.testing.assert_array_equal(out["class_id"].numpy(), best)
        assert [v.decode() for v in out["label"].numpy()] == [CLASS_NAMES[i] for i in best]


def test_reloaded_model_gives_the_trained_models_outputs(exported):
    net, _, _, uri = exported
    got = tf.saved_model.load(uri).signatures["serving_default"](images=tf.constant(PIXELS))["probabilities"]
    np.testing.assert_allclose(got.numpy(), tf.nn.softmax(net(PIXELS, training=False)).numpy(), atol=1e-6)


def test_bytes_signature_decodes_png_and_jpeg_of_any_size(exported):
    _, _, _, uri = exported
    loaded = tf.saved_model.load(uri)
    by_pixels = loaded.signatures["serving_default"](images=tf.constant(PIXELS[:2]))["probabilities"].numpy()
    png = [encoded(img, "PNG") for img in PIXELS[:2]]
    by_png = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(png))["probabilities"].numpy()
    np.testing.assert_allclose(by_png, by_pixels, atol=1e-6)
    big = np.kron(PIXELS[0], np.ones((4, 4, 1), np.uint8))  # 128x128, same picture
    by_jpeg = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant([encoded(big, "JPEG")]))
    assert by_jpeg["probabilities"].shape == (1, 10)


def test_labels_warmup_and_model_card_ship_with_the_version(exported):
    _, base, _, uri = exported
    from pathlib import Path

    version = Path(uri)
    assert (version / "assets" / "labels.txt").read_text().split() == list(CLASS_NAMES)
    card = json.loads((version / "assets.extra" / "model_card.json").read_text())
    assert card["test_accuracy"] == 0.5 and card["data_checksum"] == "sha256:x"

    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(str(version / "assets.extra" / "tf_serving_warmup_requests")))
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = log.predict_log.request
    assert request.model_spec.name == "cifar10" and request.model_spec.signature_name == "serving_default"
    assert tf.make_ndarray(request.inputs["images"]).shape == (1, 32, 32, 3)
    assert not [p for p in base.joinpath("cifar10").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_versions_grow_and_never_overwrite(tmp_path, monkeypatch):
    net = model.build("simple_cnn")
    assert export.export(net, str(tmp_path), "m", {}, PIXELS)[0] == 1
    assert export.export(net, str(tmp_path), "m", {}, PIXELS)[0] == 2
    # Another exporter published 3 after we chose our number: we take 4.
    marker = tmp_path / "m" / "3" / "theirs"
    marker.parent.mkdir()
    marker.write_text("x")
    monkeypatch.setattr(storage.LocalStorage, "published", lambda self, uri: ["1", "2"])
    assert export.export(net, str(tmp_path), "m", {}, PIXELS)[0] == 4
    assert marker.read_text() == "x"


def test_a_model_that_does_not_reload_the_same_is_not_published(tmp_path):
    net, other = model.build("simple_cnn"), model.build("simple_cnn")
    staged = tmp_path / "staged"
    export.write_saved_model(other, staged, "m", {})
    with pytest.raises(JobError, match="export check failed"):
        export.verify(net, staged, PIXELS)


@pytest.mark.slow
def test_evaluate_scores_the_exported_model(tmp_path, run_job):
    from helpers import small_overrides
    from job.config import load_config
    from job.evaluate import evaluate

    overrides = small_overrides(tmp_path, **{"train.epochs": 1})
    result, _ = run_job(overrides)
    scores = evaluate(str(tmp_path / "export" / "cifar10"), load_config(None, overrides))
    assert scores["examples"] == 300
    assert scores["accuracy"] == pytest.approx(result.test_accuracy, abs=1e-9)
    assert scores["loss"] == pytest.approx(result.test_loss, rel=1e-4)
