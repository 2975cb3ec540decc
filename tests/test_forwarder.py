"""With SERVE_BACKEND=tfserving the service forwards to TF Serving and holds
no TensorFlow: its gRPC messages are serve/protos/ (scripts/gen_protos.py),
TF Serving's own .proto files generated under another package. Here the
stand-in speaks tensorflow-serving-api's real modules and the service the
generated ones, each in its own process, so what crosses is the wire."""

import ast
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf import descriptor_pool

from helpers import REPO, ServeProcess, clean_env, pixels, png, wait_until
from tfserving_standin import FakeTFServing, start_server
from common.layout import BYTES_SIGNATURE
from serve.settings import Settings

PROTOS = REPO / "serve" / "protos"
PIXELS = pixels(2, seed=3)
# What a process that builds the app with the TF Serving backend imports, and answers, on its own.
FRESH = """
import json, sys, time
from serve.app import create_app
from serve.settings import Settings

app = create_app(Settings(backend="tfserving", tfserving_address=sys.argv[1], model_name="cifar10", poll_seconds=0.05))
client, deadline = app.test_client(), time.monotonic() + 30
while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
    time.sleep(0.05)
requests = json.loads(sys.stdin.read())
answers = {name: client.post(path, json=body).get_json() for name, (path, body) in requests["post"].items()}
answers |= {path: client.get(path).get_json() for path in requests["get"]}
app.extensions["predictor"].backend.close()
answers["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_serving"))
print(json.dumps(answers))
"""
REQUESTS = {
    "post": {"pixels": ("/v1/models/cifar10:predict", {"instances": PIXELS.tolist()}),
             "bytes": ("/v1/models/cifar10:predict", {"signature_name": BYTES_SIGNATURE, "instances": [
                 {"b64": base64.b64encode(png(image)).decode()} for image in PIXELS]})},
    "get": ["/v1/models/cifar10/metadata", "/v2/models/cifar10"],
}


@pytest.fixture(scope="module")
def upstream(exported_model):
    fake = FakeTFServing(exported_model / "1")
    server, port = start_server(fake)
    yield fake, port
    server.stop(grace=None)


def probabilities(answer: dict) -> np.ndarray:
    return np.array([p["probabilities"] for p in answer["predictions"]])


@pytest.mark.slow
def test_a_fresh_interpreter_forwards_without_importing_tensorflow(upstream, make_app):
    fake, port = upstream
    done = subprocess.run([sys.executable, "-c", FRESH, f"127.0.0.1:{port}"], input=json.dumps(REQUESTS),
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    assert answers["modules"] == []
    want = fake.signatures["serving_default"](images=tf.constant(PIXELS))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities(answers["pixels"]), want, rtol=0, atol=1e-6)
    assert probabilities(answers["bytes"]).shape == want.shape
    # Signatures decoded from the generated messages read as from tensorflow-serving-api's.
    here = make_app(Settings(backend="tfserving", tfserving_address=f"127.0.0.1:{port}", model_name="cifar10",
                             poll_seconds=0.05)).test_client()
    wait_until(lambda: here.get("/readyz").status_code == 200, timeout=10, what="the app to be ready")
    for path in REQUESTS["get"]:
        assert answers[path] == here.get(path).get_json(), path
    assert answers["/v2/models/cifar10"]["inputs"][0]["datatype"] == "UINT8"


@pytest.mark.slow
def test_cifar_serves_workers_load_no_tensorflow(upstream):
    _, port = upstream
    service = ServeProcess("--host", "127.0.0.1", "--workers", "1", env=clean_env(
        SERVE_BACKEND="tfserving", SERVE_TFSERVING_ADDRESS=f"127.0.0.1:{port}", SERVE_MODEL_NAME="cifar10",
        SERVE_POLL_SECONDS="0.1", SERVE_FRONT="none"))
    try:
        service.wait_ready(timeout=60)
        path, body = REQUESTS["post"]["pixels"]
        assert requests.post(service.url + path, json=body, timeout=30).status_code == 200
        # TensorFlow's shared libraries, mapped by any process that imported it (gunicorn's
        # post_fork hook imported it in every worker, whatever the backend).
        library = str(Path(tf.__file__).parent)
        loaded = {pid: library in Path(f"/proc/{pid}/maps").read_text() for pid in service.worker_pids()}
    finally:
        service.stop(drain=True)
    assert loaded and not any(loaded.values()), (loaded, service.output()[-3000:])


def test_the_generated_descriptors_are_tensorflow_servings_byte_for_byte():
    """What lets both sets of modules load in one process (as here, and in the in-process tests
    that start the stand-in beside the app) and makes them one wire format."""
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    generated = sorted(PROTOS.rglob("*_pb2.py"))
    assert len(generated) > 20
    for module in generated:
        tree = ast.parse(module.read_text())
        (serialized,) = [node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
                         and getattr(node.func, "attr", None) == "AddSerializedFile"]
        name = module.relative_to(PROTOS).as_posix().removesuffix("_pb2.py") + ".proto"
        assert serialized == pool.FindFileByName(name).serialized_pb, name


@pytest.mark.slow
def test_the_generated_modules_are_what_the_generator_makes(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                          env=clean_env(TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p != root / "__init__.py"}

    assert tree(tmp_path) == tree(PROTOS), "run scripts/gen_protos.py"
