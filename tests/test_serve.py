"""The prediction service with the in-process backend: every contract route,
answers equal to the SavedModel's own, hot reload, batching, limits."""

import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import tensorflow as tf
from PIL import Image
from werkzeug.serving import make_server

from helpers import PROBE, ServeProcess, png, publish, wait_until
from job import export, model
from serve.backends import Loaded
from serve.settings import Settings

PIXELS = PROBE  # the shared export knows its answers to these


def own_outputs(version_dir: str, pixels: np.ndarray) -> np.ndarray:
    sig = tf.saved_model.load(version_dir).signatures["serving_default"]
    return sig(images=tf.constant(pixels))["probabilities"].numpy()


def test_health_and_readiness(client, tmp_path, make_app):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready", "model": "cifar10", "version": 1}
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/cifar10/ready").json == {"name": "cifar10", "ready": True}
    # With no model yet: alive but not ready, on both protocols.
    empty = make_app(Settings(model_uri=str(tmp_path / "cifar10"), poll_seconds=0.2)).test_client()
    assert empty.get("/healthz").status_code == 200
    assert empty.get("/readyz").status_code == 503
    assert empty.get("/v2/health/ready").status_code == 503
    answer = empty.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:1].tolist()})
    assert answer.status_code == 503 and "no model" in answer.json["error"] and answer.headers["Retry-After"]


def test_tf_serving_rest_answers_equal_the_savedmodel(client, exported_model):
    expected = own_outputs(str(exported_model / "1"), PIXELS)
    nested = client.post("/v1/models/cifar10:predict", json={"instances": PIXELS.tolist()})
    assert nested.status_code == 200 and nested.headers["X-Model-Version"] == "1"
    predictions = nested.json["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected, atol=1e-6)
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert [p["class_id"] for p in predictions] == list(expected.argmax(axis=1))
    assert [p["label"] for p in predictions] == [labels[i] for i in expected.argmax(axis=1)]

    b64 = [{"b64": base64.b64encode(png(p)).decode()} for p in PIXELS]
    by_png = client.post("/v1/models/cifar10:predict", json={"instances": b64}).json["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in by_png], expected, atol=1e-6)


def test_model_status_and_metadata(client):
    status = client.get("/v1/models/cifar10").json
    assert status["model_version_status"][0] == {"version": "1", "state": "AVAILABLE",
                                                 "status": {"error_code": "OK", "error_message": ""}}
    meta = client.get("/v1/models/cifar10/metadata").json
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["images"]["dtype"] == "DT_UINT8" and sig["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"
    by_bytes = meta["metadata"]["signature_def"]["signature_def"]["predict_image_bytes"]
    assert by_bytes["inputs"]["image_bytes"]["dtype"] == "DT_STRING" and \
        {k: o["dtype"] for k, o in by_bytes["outputs"].items()} == {k: o["dtype"] for k, o in sig["outputs"].items()}
    v2 = client.get("/v2/models/cifar10").json
    assert v2["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert v2["outputs"] == [{"name": "class_id", "datatype": "INT64", "shape": [-1]},
                             {"name": "label", "datatype": "BYTES", "shape": [-1]},
                             {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get("/v2/models/cifar10/versions/1").json == v2
    assert client.get("/v1/models/other").status_code == 404


def test_v2_server_metadata_and_versioned_routes(client):
    server = client.get("/v2").json
    assert server["name"] == "cifar10-pipeline" and server["version"] and "binary_tensor_data" in server["extensions"]
    assert client.get("/v2/models/cifar10/versions/1/ready").json == {"name": "cifar10", "ready": True}
    body = {"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                        "data": PIXELS[0].reshape(-1).tolist()}]}
    assert client.post("/v2/models/cifar10/versions/1/infer", json=body).json["model_version"] == "1"
    # binary_data_output for the whole request; an output's own binary_data overrides it.
    binary = client.post("/v2/models/cifar10/infer", json={
        **body, "parameters": {"binary_data_output": True},
        "outputs": [{"name": "label"}, {"name": "class_id", "parameters": {"binary_data": False}}]})
    split = int(binary.headers["Inference-Header-Content-Length"])
    header = json.loads(binary.data[:split])
    (label, class_id) = header["outputs"]
    size = int.from_bytes(binary.data[split:split + 4], "little")
    assert label["parameters"]["binary_data_size"] == 4 + size == len(binary.data) - split
    assert binary.data[split + 4:].decode() == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"][class_id["data"][0]]
    for answer in (client.get("/v2/models/cifar10/versions/2"), client.get("/v2/models/cifar10/versions/2/ready"),
                   client.post("/v2/models/cifar10/versions/2/infer", json=body)):
        assert answer.status_code == 404 and "version 2 is not loaded" in answer.json["error"]


def test_v2_infer_json_equals_the_savedmodel(client, exported_model):
    expected = own_outputs(str(exported_model / "1"), PIXELS)
    body = {"id": "r1", "inputs": [{"name": "images", "shape": list(PIXELS.shape), "datatype": "UINT8",
                                    "data": PIXELS.reshape(-1).tolist()}]}
    answer = client.post("/v2/models/cifar10/infer", json=body).json
    assert answer["id"] == "r1" and answer["model_version"] == "1"
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["probabilities"]["datatype"] == "FP32" and out["probabilities"]["shape"] == [6, 10]
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(6, 10), expected, atol=1e-6)
    assert out["class_id"]["data"] == expected.argmax(axis=1).tolist()


def test_upload_of_any_size_answers_the_top_classes(client, exported_model):
    big = np.kron(PIXELS[0], np.ones((5, 5, 1), np.uint8))  # 160x160
    raw = client.post("/predict", data=png(PIXELS[0]), content_type="image/png").json
    expected = own_outputs(str(exported_model / "1"), PIXELS[:1])[0]
    assert raw["model_version"] == 1 and len(raw["predictions"]) == 5
    assert raw["predictions"][0]["class_id"] == int(expected.argmax())
    assert raw["predictions"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
    form = client.post("/predict", data={"file": (io.BytesIO(png(big)), "big.png")},
                       content_type="multipart/form-data")
    assert form.status_code == 200 and len(form.json["predictions"]) == 5
    jpeg = io.BytesIO()
    Image.fromarray(big).save(jpeg, format="JPEG")
    assert client.post("/predict", data=jpeg.getvalue(), content_type="image/jpeg").status_code == 200


@pytest.mark.parametrize("method,path,kwargs,status,words", [
    ("post", "/v1/models/cifar10:predict", {"data": "nope", "content_type": "application/json"}, 400, "JSON"),
    ("post", "/v1/models/cifar10:predict", {"json": {"instances": []}}, 400, "instances"),
    ("post", "/v1/models/cifar10:predict", {"json": {"instances": [[[0] * 3] * 32]}}, 400, "shape"),
    ("post", "/v1/models/cifar10:predict", {"json": {"instances": [np.full((32, 32, 3), 300).tolist()]}}, 400,
     "0 to 255"),
    ("post", "/v1/models/cifar10:predict", {"json": {"instances": [{"b64": "%%%"}]}}, 400, "base64"),
    ("post", "/v1/models/cifar10:predict", {"json": {"inputs": []}}, 400, "non-empty"),
    ("post", "/v1/models/cifar10:predict", {"json": {"inputs": {"pixels": [1]}}}, 400, "images"),
    ("post", "/v1/models/cifar10:predict", {"json": {"inputs": [], "instances": [1]}}, 400, "exactly one"),
    ("post", "/v1/models/nope:predict", {"json": {"instances": []}}, 404, "nope"),
    ("post", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 32, 32, 3],
                                                               "datatype": "FP32", "data": [0]}]}}, 400, "UINT8"),
    ("post", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 32, 32, 3],
                                                               "datatype": "UINT8", "data": [1, 2]}]}}, 400, "values"),
    ("post", "/predict", {"data": b"GIF89a....", "content_type": "image/png"}, 400, "decode"),
    ("post", "/predict", {"data": "x", "content_type": "text/plain"}, 400, "file"),
    ("get", "/v1/models/cifar10:predict", {}, 405, "method"),
    ("get", "/nowhere", {}, 404, "not found"),
])
def test_malformed_requests_get_a_4xx_that_says_what_is_wrong(client, method, path, kwargs, status, words):
    answer = getattr(client, method)(path, **kwargs)
    assert answer.status_code == status, answer.json
    assert words.lower() in answer.json["error"].lower()
    assert client.get("/healthz").status_code == 200


def test_pixel_values_follow_one_rule_on_every_route(client):
    """Whole numbers from 0 to 255, as integers or as floats like 12.0; a fraction is refused everywhere."""
    whole, fraction = np.full((1, 32, 32, 3), 12.0), np.full((1, 32, 32, 3), 12.5)

    def v1(pixels):
        return client.post("/v1/models/cifar10:predict", json={"instances": pixels.tolist()})

    def v2(pixels):
        return client.post("/v2/models/cifar10/infer", json={"inputs": [
            {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()}]})

    for route in (v1, v2):
        assert route(whole).status_code == 200
        refused = route(fraction)
        assert refused.status_code == 400 and "whole numbers from 0 to 255" in refused.json["error"]


def test_limits_api_keys_cors_and_request_ids(exported_model, make_app):
    settings = Settings(model_uri=str(exported_model), max_body_bytes=4096, max_instances=2, api_keys=["k1", "k2"],
                        cors_origins=["https://app.example"], poll_seconds=0.2)
    c = make_app(settings).test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200)
    ok = {"X-API-Key": "k2"}
    assert c.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:1].tolist()}).status_code == 401
    assert c.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:1].tolist()},
                  headers={"Authorization": "Bearer k1"}).status_code == 413  # 1 instance is over 4 KiB as JSON
    small = c.post("/predict", data=png(PIXELS[0]), content_type="image/png", headers=ok)
    assert small.status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200  # open routes
    cors = c.options("/v1/models/cifar10:predict", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert cors.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Access-Control-Allow-Origin" not in c.get("/healthz", headers={"Origin": "https://evil.example"}).headers
    traced = c.get("/healthz", headers={"X-Request-ID": "abc123"})
    assert traced.headers["X-Request-ID"] == "abc123" and len(c.get("/healthz").headers["X-Request-ID"]) == 32


def test_instances_over_the_limit_are_refused(exported_model, make_app):
    c = make_app(Settings(model_uri=str(exported_model), max_instances=2, poll_seconds=0.2)).test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200)
    answer = c.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:3].tolist()})
    assert answer.status_code == 400 and "at most 2" in answer.json["error"]


def test_metrics_and_the_page(client):
    client.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:2].tolist()})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'cifar_serve_requests_total{method="POST",route="/v1/models/<model:name>:predict",status="200"}' in text
    assert "cifar_serve_request_seconds_bucket" in text and "cifar_serve_batch_size_bucket" in text
    assert "cifar_serve_model_version 1.0" in text
    assert b"<input" in client.get("/").data


@pytest.fixture
def live_server(tmp_path, make_app):
    """The app on a real socket, for concurrent clients; a fresh model base it can watch."""
    base = tmp_path / "cifar10"
    publish(base, model.build("simple_cnn"), PIXELS)
    app = make_app(Settings(model_uri=str(base), poll_seconds=0.2, max_batch_size=16, batch_timeout_ms=5))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    wait_until(lambda: requests.get(url + "/readyz").status_code == 200)
    yield url, base
    server.shutdown()


def test_sixteen_concurrent_clients_see_no_errors_and_get_batched(live_server):
    url, base = live_server
    expected = own_outputs(str(base / "1"), PIXELS)

    def client(i):
        answers = []
        for _ in range(10):
            r = requests.post(f"{url}/v1/models/cifar10:predict", json={"instances": [PIXELS[i % 6].tolist()]})
            answers.append((r.status_code, r.json()["predictions"][0]["probabilities"]))
        return i, answers

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    for i, answers in results:
        for status, probs in answers:
            assert status == 200
            np.testing.assert_allclose(probs, expected[i % 6], atol=1e-5)
    sizes = requests.get(url + "/metrics").text
    # At least one model call carried more than one request.
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in sizes.splitlines() if line.startswith("cifar_serve_batch_size_bucket")}
    assert buckets["1.0"] < buckets["+Inf"]


@pytest.mark.slow
def test_a_new_version_is_served_without_a_restart_or_a_failed_request(live_server):
    url, base = live_server
    stop, failures, versions = threading.Event(), [], set()

    def hammer():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/models/cifar10:predict", json={"instances": [PIXELS[0].tolist()]})
            if r.status_code != 200:
                failures.append(r.status_code)
            versions.add(r.headers.get("X-Model-Version"))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    new_dir = publish(base, model.build("simple_cnn"), PIXELS)
    wait_until(lambda: requests.get(url + "/readyz").json()["version"] == 2)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert failures == [] and versions == {"1", "2"}
    answer = requests.post(f"{url}/v1/models/cifar10:predict", json={"instances": PIXELS.tolist()}).json()
    np.testing.assert_allclose([p["probabilities"] for p in answer["predictions"]],
                               own_outputs(str(new_dir), PIXELS), atol=1e-6)


def test_tritonclient_speaks_to_the_v2_routes(live_server):
    import tritonclient.http as triton

    url, base = live_server
    c = triton.InferenceServerClient(url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("cifar10")
    assert c.get_model_metadata("cifar10")["inputs"][0]["datatype"] == "UINT8"
    expected = own_outputs(str(base / "1"), PIXELS)
    for binary in (False, True):
        tensor = triton.InferInput("images", list(PIXELS.shape), "UINT8")
        tensor.set_data_from_numpy(PIXELS, binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = c.infer("cifar10", [tensor], outputs=[out])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    # No outputs named: tritonclient asks for all of them in binary (the request's binary_data_output).
    result = c.infer("cifar10", [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("class_id"), expected.argmax(axis=1))
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert [v.decode() for v in result.as_numpy("label")] == [labels[i] for i in expected.argmax(axis=1)]


def test_a_model_on_s3_is_served(s3, tmp_path, make_app):
    import boto3

    remote = f"s3://{s3}/models"
    net = model.build("simple_cnn")
    export.export(net, remote, "cifar10", {}, PIXELS)  # version 1, published with its marker

    boto3.client("s3").put_object(Bucket=s3, Key="models/cifar10/7/saved_model.pb", Body=b"half-uploaded")
    c = make_app(Settings(model_uri=f"{remote}/cifar10", poll_seconds=0.2, cache_dir=str(tmp_path / "cache")))
    c = c.test_client()
    wait_until(lambda: c.get("/readyz").status_code == 200)
    assert c.get("/readyz").json["version"] == 1  # 7 has no completion marker
    answer = c.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:2].tolist()})
    expected = tf.nn.softmax(net(PIXELS[:2], training=False)).numpy()
    np.testing.assert_allclose([p["probabilities"] for p in answer.json["predictions"]], expected, atol=1e-6)



@pytest.mark.slow
def test_cifar_serve_runs_gunicorn_and_drains_on_sigterm(exported_model):
    """Two workers, as on a 2-core machine by default: /metrics counts both, whichever answers."""
    service = ServeProcess("--model-uri", str(exported_model), "--workers", "2",
                           env={**os.environ, "SERVE_POLL_SECONDS": "0.5", "SERVE_DRAIN_SECONDS": "1"})
    url = service.url
    proc = service.proc
    try:
        service.wait_ready(timeout=90)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: requests.post(f"{url}/v1/models/cifar10:predict",
                                                            json={"instances": [PIXELS[0].tolist()]}), range(12)))
        assert all(a.status_code == 200 and a.headers["X-Request-ID"] for a in answers)
        counted = 'cifar_serve_requests_total{method="POST",route="/v1/models/<model:name>:predict",status="200"} 12.0'
        for _ in range(6):  # scrapes land on either worker
            text = requests.get(url + "/metrics").text
            assert counted in text and "cifar_serve_model_version 1.0" in text
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        service.stop()
    assert proc.returncode == 0
    out = wait_until(lambda: service.output() if "Shutting down" in service.output() else None, timeout=10)
    assert "serve.workers.Worker" in out and "request_id=" in out  # gunicorn's worker class and our access log


def test_cifar_serve_without_a_model_uri_exits_2():
    done = subprocess.run([sys.executable, "-m", "serve", "--port", "1"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SERVE_")})
    assert done.returncode == 2 and "--model-uri" in done.stderr


def test_serve_never_imports_job():
    root = os.path.join(os.path.dirname(__file__), "..", "serve")
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "from job" not in text and "import job" not in text, name


class OneOutput:
    """A backend whose model has a single output, as versions exported before class_id and label were."""

    def predict(self, images):
        return {"probabilities": np.full((len(images), 10), 0.1, np.float32)}, self.status()

    def status(self):
        return Loaded(1, None, ())

    def close(self):
        pass


def test_a_signature_with_one_output_answers_bare_values_as_tf_serving_does(make_app):
    client = make_app(Settings(model_uri="/nowhere/cifar10"), backend=OneOutput()).test_client()
    row = client.post("/v1/models/cifar10:predict", json={"instances": PIXELS[:2].tolist()}).json
    columns = client.post("/v1/models/cifar10:predict", json={"inputs": PIXELS[:2].tolist()}).json
    expected = np.full((2, 10), 0.1, np.float32).tolist()
    assert row == {"predictions": expected} and columns == {"outputs": expected}


@pytest.mark.parametrize("cgroup, available_gib, cores, expected", [
    ("max", 64, 8, 4),  # no limit, plenty of memory: one per core, at most 4
    ("max", 64, 2, 2),
    (str(1 * 2**30), 64, 4, 1),  # a 1 GiB container: 4 workers need about 1.4 GiB by the measured figures
    (str(3 * 2**29), 64, 4, 2),  # 1.5 GiB
    (str(3 * 2**30), 64, 4, 4),
    ("9223372036854771712", 1, 4, 1),  # cgroup v1's "no limit", and 1 GiB available on the host
    (str(2**29), 64, 4, 1),  # below what one worker needs: still one
])
def test_default_workers_follow_cores_and_memory(tmp_path, monkeypatch, cgroup, available_gib, cores, expected):
    from serve import settings

    (tmp_path / "memory.max").write_text(cgroup + "\n")
    (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_gib * 2**20} kB\n")
    monkeypatch.setattr(settings, "CGROUP_MEMORY_LIMITS", (tmp_path / "memory.max", tmp_path / "absent"))
    monkeypatch.setattr(settings, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.delenv("SERVE_WORKERS", raising=False)
    assert Settings().workers == expected
