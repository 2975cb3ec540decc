"""The routes, as blueprints: health, TF Serving REST (v1), Open Inference
Protocol v2, image upload, SageMaker's endpoint, and the page, metrics and
OpenAPI document."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, abort, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from serve import images, metrics, schemas
from serve.images import BadInput

health = Blueprint("health", __name__)
tfserving_rest = Blueprint("tfserving_rest", __name__)
v2 = Blueprint("v2", __name__)
upload = Blueprint("upload", __name__)
sagemaker = Blueprint("sagemaker", __name__)
pages = Blueprint("pages", __name__, static_folder="static")


def _predictor():
    return current_app.extensions["predictor"]


def _loaded():
    return _predictor().backend.status()


def _check_name(name: str) -> None:
    expected = current_app.extensions["settings"].name
    if name != expected:
        abort(404, f"no model named {name!r}; this service serves {expected!r}")


def _body(model):
    """The JSON body validated against `model`, or a 400 that says what is wrong."""
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # `silent` only covers ValueError; JSON nested ~1000 deep ends here
        data = None
    if data is None:
        raise BadInput("the body must be JSON (Content-Type: application/json)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _bad(exc) from None


def _bad(exc: ValidationError) -> BadInput:
    """A pydantic error as the 400 message: where in the body, and what is wrong there."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return BadInput(f"{where}: {first['msg']}")


# --- health -----------------------------------------------------------------

@health.get("/healthz")
def healthz():
    return jsonify(status="ok")


@health.get("/readyz")
@health.get("/ping")  # SageMaker's health check, which reads only the status
def readyz():
    loaded = _loaded()
    if loaded is None:
        return jsonify(status="not ready", model=current_app.extensions["settings"].name), 503
    return jsonify(status="ready", model=current_app.extensions["settings"].name, version=loaded.version)


# --- TF Serving REST ----------------------------------------------------------

def _loaded_or_404(name: str):
    _check_name(name)
    loaded = _loaded()
    if loaded is None:
        abort(404, f"model {name!r} has no version loaded yet")
    return loaded


@tfserving_rest.get("/v1/models/<model:name>")
def v1_status(name):
    loaded = _loaded_or_404(name)
    return jsonify(model_version_status=[{"version": str(loaded.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}])


@tfserving_rest.get("/v1/models/<model:name>/metadata")
def v1_metadata(name):
    loaded = _loaded_or_404(name)

    def tensor(dtype, dims):
        return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                                 "unknown_rank": False}}

    signature = {"inputs": {"images": {"name": "serving_default_images:0", **tensor("DT_UINT8", [-1, 32, 32, 3])}},
                 "outputs": {"probabilities": {"name": "StatefulPartitionedCall:0",
                                               **tensor("DT_FLOAT", [-1, 10])}},
                 "method_name": "tensorflow/serving/predict"}
    return jsonify(model_spec={"name": name, "signature_name": "", "version": str(loaded.version)},
                   metadata={"signature_def": {"signature_def": {"serving_default": signature},
                                               "labels": list(loaded.labels)}})


@tfserving_rest.post("/v1/models/<model:name>:predict")
def v1_predict(name):
    _check_name(name)
    body = _body(schemas.PredictRequest)
    if body.signature_name not in (None, "serving_default"):
        raise BadInput(f"unknown signature_name {body.signature_name!r}; use serving_default")
    batch = np.stack([images.instance(x, f"instances[{i}]") for i, x in enumerate(body.instances)])
    del body  # thousands of small lists: not kept alive while the request waits for its batch
    probabilities, loaded = _predictor().predict(batch)
    predictions = [{"label": loaded.labels[int(np.argmax(p))], "class_id": int(np.argmax(p)),
                    "probabilities": [float(v) for v in p]} for p in probabilities]
    return jsonify(predictions=predictions), 200, {"X-Model-Version": str(loaded.version)}


# --- Open Inference Protocol v2 -------------------------------------------------

INPUT, OUTPUT = "images", "probabilities"


@v2.get("/v2/health/live")
def v2_live():
    return jsonify(live=True)


@v2.get("/v2/health/ready")
def v2_ready():
    ready = _loaded() is not None
    return jsonify(ready=ready), 200 if ready else 503


@v2.get("/v2/models/<model:name>")
@v2.get("/v2/models/<model:name>/versions/<version>")
def v2_metadata(name, version=None):
    _check_name(name)
    loaded = _loaded()
    return jsonify(name=name, versions=[str(loaded.version)] if loaded else [], platform="tensorflow_savedmodel",
                   inputs=[{"name": INPUT, "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
                   outputs=[{"name": OUTPUT, "datatype": "FP32", "shape": [-1, 10]}])


@v2.get("/v2/models/<model:name>/ready")
@v2.get("/v2/models/<model:name>/versions/<version>/ready")
def v2_model_ready(name, version=None):
    _check_name(name)
    ready = _loaded() is not None
    return jsonify(name=name, ready=ready), 200 if ready else 503


@v2.post("/v2/models/<model:name>/infer")
@v2.post("/v2/models/<model:name>/versions/<version>/infer")
def v2_infer(name, version=None):
    _check_name(name)
    header_length = request.headers.get("Inference-Header-Content-Length")
    raw = request.get_data()
    # The binary tensor extension: a JSON header, then the tensors' raw bytes.
    binary = b""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadInput("Inference-Header-Content-Length must be an integer") from None
        if not 0 < split <= len(raw):
            raise BadInput("Inference-Header-Content-Length is outside the body")
        raw, binary = raw[:split], raw[split:]
    try:
        body = schemas.V2InferRequest.model_validate(json.loads(raw))
    except ValidationError as exc:  # first: pydantic's ValidationError is a ValueError too
        raise _bad(exc) from None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply, or a >4300-digit integer
        raise BadInput("the inference header must be JSON") from None
    tensor = next((t for t in body.inputs if t.name == INPUT), None)
    if tensor is None or len(body.inputs) != 1:
        raise BadInput(f"expected exactly one input, named {INPUT!r}")
    if tensor.datatype != "UINT8":
        raise BadInput(f"input {INPUT!r} must be UINT8, got {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [32, 32, 3] or shape[0] < 1:
        raise BadInput(f"input {INPUT!r} must have shape [N, 32, 32, 3], got {shape}")
    count = math.prod(shape)  # exact: np.prod wraps around at 2**63
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count or len(binary) < size:
            raise BadInput(f"binary_data_size {size} does not match shape {shape} or the body")
        batch = np.frombuffer(binary[:size], dtype=np.uint8).reshape(shape)
    else:
        if tensor.data is None:
            raise BadInput(f"input {INPUT!r} has no data")
        flat = np.asarray(tensor.data, dtype=object).reshape(-1) if tensor.data else np.array([])
        try:
            values = np.asarray(flat.tolist(), dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise BadInput(f"input {INPUT!r}: data must be numbers") from None
        if values.size != count:
            raise BadInput(f"input {INPUT!r}: {values.size} values for shape {shape}")
        if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 255
                            or np.any(values != np.rint(values))):
            raise BadInput(f"input {INPUT!r}: UINT8 values are whole numbers from 0 to 255")
        batch = values.astype(np.uint8).reshape(shape)
    probabilities, loaded = _predictor().predict(batch)
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    wants_binary = any((o.parameters or {}).get("binary_data") for o in body.outputs or [])
    out = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
    answer = {"model_name": name, "model_version": str(loaded.version), "outputs": [out]}
    if body.id is not None:
        answer["id"] = body.id
    if not wants_binary:
        out["data"] = probabilities.reshape(-1).tolist()
        return jsonify(answer)
    payload = probabilities.tobytes()
    out["parameters"] = {"binary_data_size": len(payload)}
    header = json.dumps(answer).encode()
    return Response(header + payload, content_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


# --- upload -----------------------------------------------------------------------

@upload.post("/predict")
def predict_upload():
    if request.mimetype in ("image/png", "image/jpeg"):
        data = request.get_data()
    elif request.mimetype == "multipart/form-data":
        file = request.files.get("file")
        if file is None:
            raise BadInput('send the image as multipart field "file", or as an image/png or image/jpeg body')
        data = file.read()
    else:
        raise BadInput('send the image as multipart field "file", or as an image/png or image/jpeg body')
    probabilities, loaded = _predictor().predict(images.decode(data)[None])
    order = np.argsort(-probabilities[0])[:5]
    top = [{"label": loaded.labels[i], "class_id": int(i), "probability": float(probabilities[0][i])} for i in order]
    return jsonify(model_version=loaded.version, predictions=top)


# --- SageMaker -----------------------------------------------------------------------

UPLOAD_TYPES = ("image/png", "image/jpeg", "multipart/form-data")


@sagemaker.post("/invocations")
def invocations():
    # SageMaker has one inference route; the Content-Type says which of ours the body is for.
    if request.mimetype == "application/json":
        return v1_predict(current_app.extensions["settings"].name)
    if request.mimetype in UPLOAD_TYPES:
        return predict_upload()
    return jsonify(error=f"unsupported Content-Type {request.mimetype or '(none)'!r}; send application/json "
                         "(TF Serving's predict body), image/png or image/jpeg"), 415


# --- page, metrics, OpenAPI -------------------------------------------------------

@pages.get("/")
def index():
    page = (Path(pages.static_folder) / "index.html").read_text()
    if current_app.extensions["settings"].api_keys:
        page = page.replace("<body>", "<body data-api-key-required>", 1)
    return Response(page, content_type="text/html; charset=utf-8")


@pages.get("/metrics")
def prometheus():
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


@pages.get("/openapi.json")
def openapi():
    return jsonify(schemas.openapi(current_app.extensions["settings"].name))

