"""The TF Serving backend against a real gRPC server built from
tensorflow-serving-api's own service definitions, answering with a real
exported SavedModel, through the real Flask app."""

import base64
import contextvars
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf

from helpers import pixels, png, wait_until
from tfserving_standin import AVAILABLE, LOADING, FakeTFServing, start_server
from serve.batching import request_ids
from serve.settings import Settings

PIXELS = pixels(3, seed=7)


@pytest.fixture(scope="session")
def exported(exported_model):
    """The version directory of one exported model, with its probe record."""
    return str(exported_model / "1")


@pytest.fixture(scope="session")
def signatures(exported):
    return tf.saved_model.load(exported).signatures


@pytest.fixture(scope="session")
def signature(signatures):
    return signatures["serving_default"]


@pytest.fixture(scope="module")
def upstream(exported):
    fake = FakeTFServing(exported)
    server, port = start_server(fake)
    yield fake, port
    fake.release.set()
    server.stop(grace=None)


@pytest.fixture
def make_client(upstream, make_app):
    """A fresh app (and backend) on the fake, closed after the test."""
    fake, port = upstream
    fake.reset()

    def make(port=port, **overrides):
        values = {"backend": "tfserving", "tfserving_address": f"127.0.0.1:{port}", "model_name": "cifar10",
                  "poll_seconds": 0.05, **overrides}
        return make_app(Settings(**values)).test_client()

    yield make
    fake.release.set()


def wait_for(client, path, status, seconds=5.0):
    """The first answer to GET path with this status, polled every 20 ms for up to `seconds`."""
    def answered():
        response = client.get(path)
        return response if response.status_code == status else None

    return wait_until(answered, timeout=seconds, interval=0.02, what=f"GET {path} to answer {status}")


def expected(signature, pixels):
    return signature(images=tf.constant(pixels))["probabilities"].numpy()


def test_ready_only_once_tf_serving_reports_a_version_available(upstream, make_client):
    fake, _ = upstream
    fake.versions = {1: LOADING}
    client = make_client()
    time.sleep(0.2)  # a few polls
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.get_json()["reason"] == "no version in TF Serving yet"
    assert client.get("/v2/health/ready").status_code == 503
    fake.versions = {1: AVAILABLE, 2: LOADING}
    response = wait_for(client, "/readyz", 200)
    assert response.status_code == 200 and response.get_json()["version"] == 1
    fake.versions = {1: AVAILABLE, 2: AVAILABLE}  # the highest AVAILABLE version is the one served
    wait_until(lambda: client.get("/readyz").get_json().get("version") == 2, timeout=5, interval=0.02)
    assert client.get("/readyz").get_json()["version"] == 2
    assert client.get("/v1/models/cifar10").get_json()["model_version_status"][0]["version"] == "2"


def test_unknown_model_name_is_not_ready(upstream, make_client):
    client = make_client(model_name="other")
    time.sleep(0.2)
    not_ready = client.get("/readyz")
    # TF Serving's own message, and its address, are in the log, not on an open route.
    assert not_ready.status_code == 503
    assert not_ready.get_json()["reason"] == "TF Serving unreachable or without the model"


@pytest.mark.parametrize("float_val", [False, True], ids=["tensor_content", "float_val"])
def test_v1_predict_nested_lists_and_png_give_the_saved_models_probabilities(upstream, make_client, signature,
                                                                              float_val):
    fake, _ = upstream
    fake.float_val = float_val
    client = make_client()
    response = client.post("/v1/models/cifar10:predict", json={"instances": [
        PIXELS[0].tolist(), {"b64": base64.b64encode(png(PIXELS[1])).decode()}, PIXELS[2].tolist()]})
    assert response.status_code == 200, response.get_json()
    assert response.headers["X-Model-Version"] == "1"
    predictions = response.get_json()["predictions"]
    got = np.array([p["probabilities"] for p in predictions])
    np.testing.assert_allclose(got, expected(signature, PIXELS), rtol=0, atol=1e-6)
    assert [p["class_id"] for p in predictions] == list(np.argmax(got, axis=1))
    assert predictions[0]["label"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                       "ship", "truck")


def test_v2_infer_json(make_client, signature):
    client = make_client()
    response = client.post("/v2/models/cifar10/infer", json={"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [3, 32, 32, 3], "data": PIXELS.reshape(-1).tolist()}]})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    own = signature(images=tf.constant(PIXELS))
    assert body["model_version"] == "1"
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("class_id", "INT64", [3]), ("label", "BYTES", [3]), ("probabilities", "FP32", [3, 10])]
    class_id, label, probabilities = (o["data"] for o in body["outputs"])
    assert class_id == own["class_id"].numpy().tolist() and label == [v.decode() for v in own["label"].numpy()]
    np.testing.assert_array_equal(np.array(probabilities, np.float32).reshape(3, 10), own["probabilities"].numpy())


def test_request_ids_reach_tf_serving_as_grpc_metadata_every_id_of_a_batch(upstream, make_client):
    fake, _ = upstream
    # Long enough for requests sent together to share one batch, on the batcher's thread.
    client = make_client(batch_timeout_ms=300)
    wait_for(client, "/readyz", 200)
    assert client.get("/v1/models/cifar10/metadata", headers={"X-Request-ID": "meta-1"}).status_code == 200
    response = client.post("/v1/models/cifar10:predict", headers={"X-Request-ID": "abc"},
                           json={"instances": [PIXELS[0].tolist()]})
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "abc"
    assert ("GetModelMetadata", ["meta-1"]) in fake.request_ids and ("Predict", ["abc"]) in fake.request_ids

    fake.request_ids.clear()
    ids = [f"batch-{i}" for i in range(4)]
    start = threading.Barrier(len(ids))

    def send(request_id):
        start.wait()
        return client.application.test_client().post(
            "/v1/models/cifar10:predict", headers={"X-Request-ID": request_id},
            json={"instances": [PIXELS[0].tolist()]}).status_code

    with futures.ThreadPoolExecutor(len(ids)) as pool:
        assert list(pool.map(send, ids)) == [200] * len(ids)
    predicts = [sent for method, sent in fake.request_ids if method == "Predict"]
    assert sorted(i for sent in predicts for i in sent) == ids and max(map(len, predicts)) > 1
    # The status poll answers no request: it carries no id.
    assert all(not sent for method, sent in fake.request_ids if method == "GetModelStatus")


def test_a_batch_of_many_long_request_ids_still_goes_through(upstream, make_client):
    """gRPC starts refusing metadata over 8 KiB; the ids past the backend's budget are left out, not the call."""
    fake, _ = upstream
    backend = make_client().application.extensions["predictor"].backend
    ids = tuple(f"{i:03d}" + "x" * 125 for i in range(256))

    def predict():
        request_ids.set(ids)
        return backend.predict(np.repeat(PIXELS[:1], len(ids), axis=0))

    outputs, _ = contextvars.copy_context().run(predict)
    assert len(outputs["probabilities"]) == len(ids)
    sent = [sent for method, sent in fake.request_ids if method == "Predict"][-1]
    assert 0 < len(sent) < len(ids) and sent == list(ids[:len(sent)])


def test_a_batch_larger_than_grpcs_default_4mb_goes_through(make_client, signature):
    client = make_client(max_instances=2000)
    backend = client.application.extensions["predictor"].backend
    batch = pixels(1500, seed=1)
    assert batch.nbytes > 4 * 1024 * 1024
    outputs, loaded = backend.predict(batch)
    probabilities = outputs["probabilities"]
    np.testing.assert_array_equal(outputs["class_id"], probabilities.argmax(axis=1))
    assert probabilities.shape == (1500, 10) and probabilities.dtype == np.float32 and loaded.version == 1
    np.testing.assert_allclose(probabilities[:5], expected(signature, batch[:5]), rtol=0, atol=1e-6)


def test_an_answer_larger_than_grpcs_default_4mb_is_received(upstream, make_client, signature):
    # gRPC's 4 MB default limits what a channel receives; with it this would be RESOURCE_EXHAUSTED.
    fake, _ = upstream
    fake.padding = 5 * 1024 * 1024
    client = make_client()
    response = client.post("/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]})
    assert response.status_code == 200, response.get_json()
    got = np.array([response.get_json()["predictions"][0]["probabilities"]])
    np.testing.assert_allclose(got, expected(signature, PIXELS[:1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.NOT_FOUND, 503),
    (grpc.StatusCode.FAILED_PRECONDITION, 503),
    (grpc.StatusCode.INTERNAL, 502),
    (grpc.StatusCode.INVALID_ARGUMENT, 502),
])
def test_upstream_errors_map_to_gateway_statuses_and_the_app_recovers(upstream, make_client, code, status):
    fake, port = upstream
    client = make_client()
    fake.fail = code
    response = client.post("/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]})
    assert response.status_code == status
    error = response.get_json()["error"]
    assert f"127.0.0.1:{port}" in error and code.name in error
    assert "frame.cc" not in error and "Traceback" not in error  # the first line of the details only
    fake.fail = None
    response = client.post("/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]})
    assert response.status_code == 200


def test_a_slow_tf_serving_is_a_504(upstream, make_client):
    fake, port = upstream
    client = make_client(tfserving_timeout_s=0.3)
    fake.delay = 5.0
    started = time.monotonic()
    response = client.post("/v2/models/cifar10/infer", json={"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": PIXELS[0].reshape(-1).tolist()}]})
    assert response.status_code == 504 and time.monotonic() - started < 3
    error = response.get_json()["error"]
    assert f"127.0.0.1:{port}" in error and "DEADLINE_EXCEEDED" in error
    fake.release.set()
    fake.delay = 0.0
    assert client.post("/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]}).status_code == 200


def test_tf_serving_gone_is_a_503_not_a_500(exported, make_client):
    fake = FakeTFServing(exported)
    server, port = start_server(fake)
    try:
        client = make_client(port=port)
        assert wait_for(client, "/readyz", 200).status_code == 200
        assert client.post("/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]}).status_code == 200
    finally:
        server.stop(grace=None).wait()
    response = client.post("/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]})
    assert response.status_code == 503
    assert f"127.0.0.1:{port}" in response.get_json()["error"]
    assert wait_for(client, "/readyz", 503).status_code == 503
    assert client.get("/healthz").status_code == 200


def tf_serving_rest(outputs):
    """TF Serving's documented REST answers for a signature's outputs when it has several: row
    format, one object per instance keyed by output name; columnar, an object of output name -> batch list."""
    outputs = {name: value.numpy().tolist() for name, value in sorted(outputs.items())}
    outputs["label"] = [v.decode() for v in outputs["label"]]
    rows = [{name: value[i] for name, value in outputs.items()} for i in range(len(outputs["label"]))]
    return {"predictions": rows}, {"outputs": outputs}


def test_v1_answers_are_tf_servings_for_the_savedmodel_and_the_same_bytes_through_both_backends(
        upstream, make_client, make_app, signatures, exported):
    local = make_app(Settings(model_uri=str(Path(exported).parent), poll_seconds=0.2)).test_client()
    wait_for(local, "/readyz", 200)
    remote = make_client()
    wait_for(remote, "/readyz", 200)
    rows, columns = tf_serving_rest(signatures["serving_default"](images=tf.constant(PIXELS)))
    # Not 32x32: the signature's own decoding and resizing is what answers.
    encoded = [png(np.kron(p, np.ones((3, 2, 1), np.uint8))) for p in PIXELS]
    b64 = [{"b64": base64.b64encode(e).decode()} for e in encoded]
    bytes_rows, bytes_columns = tf_serving_rest(
        signatures["predict_image_bytes"](image_bytes=tf.constant(encoded)))
    answers = [
        ("/v1/models/cifar10:predict", {"instances": PIXELS.tolist()}, 200, rows),
        ("/v1/models/cifar10:predict", {"signature_name": "serving_default", "inputs": PIXELS.tolist()},
         200, columns),
        ("/v1/models/cifar10:predict", {"inputs": {"images": PIXELS.tolist()}}, 200, columns),
        ("/v1/models/cifar10/versions/1:predict", {"instances": PIXELS.tolist()}, 200, rows),
        ("/v1/models/cifar10:predict", {"signature_name": "predict_image_bytes", "instances": b64},
         200, bytes_rows),
        ("/v1/models/cifar10/versions/1:predict",
         {"signature_name": "predict_image_bytes", "inputs": {"image_bytes": b64}}, 200, bytes_columns),
        ("/v1/models/cifar10/versions/2:predict", {"instances": PIXELS.tolist()}, 404,
         {"error": "Servable not found for request: Specific(cifar10, 2)"}),
        ("/v1/models/cifar10/labels/stable:predict", {"instances": PIXELS.tolist()}, 404,
         {"error": "Unrecognized servable version label: stable"}),
    ]
    for path, body, status, answer in answers:
        got = [client.post(path, json=body) for client in (local, remote)]
        assert [r.status_code for r in got] == [status, status], path
        assert got[0].get_json() == answer, path
        assert got[0].data == got[1].data, path
    for path, status in [("/v1/models/cifar10/versions/1", 200), ("/v1/models/cifar10/versions/1/metadata", 200),
                         ("/v1/models/cifar10/versions/3", 404),
                         ("/v1/models/cifar10/labels/canary/metadata", 404),
                         ("/v2/models/cifar10", 200), ("/v2/models/cifar10/versions/3", 404)]:
        got = [client.get(path) for client in (local, remote)]
        assert [r.status_code for r in got] == [status, status] and got[0].data == got[1].data, path
    outputs = local.get("/v1/models/cifar10/metadata").get_json()[
        "metadata"]["signature_def"]["signature_def"]["serving_default"]["outputs"]
    assert {name: (o["dtype"], [int(d["size"]) for d in o["tensor_shape"]["dim"]]) for name, o in outputs.items()} \
        == {name: ("DT_" + {"float32": "FLOAT", "int64": "INT64", "string": "STRING"}[spec.dtype.name],
                   [-1 if d is None else d for d in spec.shape.as_list()])
            for name, spec in signatures["serving_default"].structured_outputs.items()}


def test_labels_through_tf_serving_are_the_models_own(tmp_path, make_client):
    """A model trained on other classes: its labels come from TF Serving's answer, not from CIFAR-10's names."""
    from job import export, model

    names = [f"class {i}" for i in range(10)]
    uri = export.export(model.build("simple_cnn"), str(tmp_path), "cifar10", {}, PIXELS, class_names=names)[1]
    fake = FakeTFServing(uri)
    server, port = start_server(fake)
    try:
        client = make_client(port=port)
        assert wait_for(client, "/readyz", 200).status_code == 200
        answer = client.post("/v1/models/cifar10:predict", json={"inputs": PIXELS.tolist()}).get_json()["outputs"]
        assert answer["label"] == [names[i] for i in answer["class_id"]]
    finally:
        server.stop(grace=None).wait()
