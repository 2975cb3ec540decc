"""Export for TF Serving: `<export.uri>/<model_name>/<version>/`.

The version directory is staged and published in one step, since TF Serving
polls its folder and fails on a half-written version (tensorflow/serving#631).
Before publishing, the staged model is loaded back and must give the
in-memory model's outputs on a fixed batch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from common import layout
from common.layout import BYTES_SIGNATURE, SIGNATURE
from common.redact import redact_data
from job import storage
from job.errors import JobError

KEY = "export.uri"  # the config key export errors lead with


class ServingModule(tf.Module):
    def __init__(self, model, labels_file: str):
        super().__init__()
        self.model = model
        # The labels live inside the SavedModel (as assets/labels.txt, line i naming class i),
        # so TF Serving answers them too, not only this project's service.
        self.labels = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
            labels_file, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
            tf.string, tf.lookup.TextFileIndex.WHOLE_LINE), default_value="")

    # The argument's name is the signature's input name: layout.INPUT.
    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name=layout.INPUT)])
    def serve(self, images):
        probabilities = tf.nn.softmax(tf.cast(self.model(images, training=False), tf.float32))
        class_id = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        return {layout.PROBABILITIES: probabilities, layout.CLASS_ID: class_id,
                layout.LABEL: self.labels.lookup(class_id)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=layout.BYTES_INPUT)])
    def serve_bytes(self, image_bytes):
        """Encoded PNG or JPEG of any size, for TF Serving's `{"b64": ...}` clients."""

        def decode(encoded):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            image = tf.image.resize(image, [32, 32], antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([32, 32, 3], tf.uint8))
        return self.serve(images)


def _warmup_record(model_name: str) -> bytes:
    # TF Serving replays these requests at load so the first client does not
    # pay for graph initialisation.
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE))
    request.inputs[layout.INPUT].CopyFrom(tf.make_tensor_proto(np.zeros((1, 32, 32, 3), np.uint8)))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return log.SerializeToString()


def write_saved_model(model, directory: Path, model_name: str, card: dict,
                      class_names: Sequence[str] = layout.CIFAR10_CLASSES) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # saved_model.save copies it into the version as assets/labels.txt (layout.LABELS).
        labels = Path(tmp) / Path(layout.LABELS).name
        layout.write_labels(labels, class_names)
        module = ServingModule(model, str(labels))
        tf.saved_model.save(module, str(directory), signatures={
            SIGNATURE: module.serve, BYTES_SIGNATURE: module.serve_bytes})
    (directory / layout.WARMUP).parent.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(directory / layout.WARMUP)) as writer:
        writer.write(_warmup_record(model_name))
    # The card goes wherever the model goes: a presigned data.uri in its config is a credential.
    (directory / layout.CARD).write_text(json.dumps(redact_data(card), indent=2, sort_keys=True))


def _write_probe_record(directory: Path, served, probe: np.ndarray) -> None:
    """layout.PROBE_IMAGES and PROBE_OUTPUTS: what the service checks a version
    against before serving it.

    The outputs are the written SavedModel's own, loaded back, rather than the
    in-memory model's: the service runs that graph, and the eager model may
    pick other kernels (see `verify`), which would eat into the service's
    tolerance for no reason. `verify` separately holds the graph to the model.
    """
    outputs = served(**{layout.INPUT: tf.constant(probe, tf.uint8)})
    np.save(directory / layout.PROBE_IMAGES, np.asarray(probe, np.uint8))
    # Strings as unicode arrays: an object array would need pickle to read back.
    np.savez(directory / layout.PROBE_OUTPUTS, **{
        name: np.char.decode(value.numpy().astype(bytes), "utf-8") if value.dtype == tf.string else value.numpy()
        for name, value in outputs.items()})


def verify(model, directory: Path, probe: np.ndarray):
    """Hold the written SavedModel to the trained model; return its serving signature."""
    expected = tf.nn.softmax(tf.cast(model(probe, training=False), tf.float32)).numpy()
    loaded = tf.saved_model.load(str(directory)).signatures[SIGNATURE]
    got = loaded(**{layout.INPUT: tf.constant(probe)})[layout.PROBABILITIES].numpy()
    # In float16 the traced graph and the eager model may pick different
    # kernels (oneDNN's AMX and AVX-512 FP16 ones on recent Xeons): measured
    # up to 3.4e-5 apart there. A broken export is off by far more than either bound.
    tolerance = 1e-3 if any(layer.compute_dtype == "float16" for layer in model.layers) else 1e-6
    if not np.allclose(got, expected, rtol=0, atol=tolerance):
        raise JobError(f"export check failed: the reloaded SavedModel differs from the trained model "
                       f"by up to {np.abs(got - expected).max():.3g}; nothing was published")
    return loaded


def export(model, export_uri: str, model_name: str, card: dict, probe: np.ndarray,
           class_names: Sequence[str] = layout.CIFAR10_CLASSES, retry_seconds: float = 0.0) -> tuple[int, str]:
    """Publish the next version, labelled with `class_names`; return (version, its URI).

    Publishing retries through a storage outage for `retry_seconds` (the
    run's checkpoint.retry_seconds), as checkpoint commits do; beyond that,
    and at once where waiting cannot help (a full disk), a StorageError led
    by export.uri. Whatever fails, the staged version is removed.
    """
    base = storage.join(export_uri, model_name)
    backend = storage.backend(export_uri, KEY)
    staged = backend.staging(base)
    try:
        with storage.writing(staged, KEY):
            write_saved_model(model, staged, model_name, card, class_names)
            # One load of the written model serves both the check and the probe record.
            _write_probe_record(staged, verify(model, staged, probe), probe)
        version = 1 + max((int(n) for n in backend.published(base) if n.isdigit()), default=0)
        while True:
            try:
                storage.retry(backend.publish, staged, storage.join(base, str(version)), seconds=retry_seconds)
                return version, storage.join(base, str(version))
            except FileExistsError:
                version += 1  # another export took this number first
    finally:
        # Published, it is gone already (renamed, or uploaded and removed).
        shutil.rmtree(staged, ignore_errors=True)
