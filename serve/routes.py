"""The routes, as blueprints: health, TF Serving REST (v1), Open Inference
Protocol v2, image upload, SageMaker's endpoint, and the page, metrics and
OpenAPI document."""

from __future__ import annotations

import json
import math
from importlib.metadata import version as package_version
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from google.protobuf import json_format
from flask import Blueprint, Response, abort, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from common.layout import BYTES_INPUT, BYTES_SIGNATURE, INPUT, SIGNATURE
from serve import images, metrics, openapi as openapi_document, schemas
from serve.backends import Unavailable
from serve.images import BadInput

health = Blueprint("health", __name__)
tfserving_rest = Blueprint("tfserving_rest", __name__)
v2 = Blueprint("v2", __name__)
upload = Blueprint("upload", __name__)
sagemaker = Blueprint("sagemaker", __name__)
pages = Blueprint("pages", __name__, static_folder="static")
# Swagger UI's dist files as the swagger-ui-py wheel ships them (its framework glue unused), under /docs/;
# nested in the pages so that registering the pages brings them.
swagger_ui = Blueprint("docs", __name__, static_url_path="/docs",
                       static_folder=Path(find_spec("swagger_ui").submodule_search_locations[0]) / "static")
pages.register_blueprint(swagger_ui)
SERVER_VERSION = package_version("cifar10-pipeline")


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
    name, loaded = current_app.extensions["settings"].name, _loaded()
    if loaded is not None and not current_app.extensions["draining"].is_set():
        return jsonify(status="ready", model=name, version=loaded.version)
    # Readiness may wait on the backend's rollout checks (a pinned version not
    # there yet, refused versions), on a model store it cannot read, or on a
    # shutdown: the body says which, for whoever looks at a pod that never
    # becomes ready.
    if current_app.extensions["draining"].is_set():
        reason = "shutting down: finishing what was already sent"
    else:
        reason = getattr(current_app.extensions["predictor"].backend, "waiting_for", None)
    return jsonify(status="not ready", model=name, **({"reason": reason} if reason else {})), 503


# --- TF Serving REST ----------------------------------------------------------


def _outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs the model answered, in name order as TF Serving writes them, strings as text."""
    return {name: np.array([v.decode() for v in value], dtype=object) if value.dtype == object else value
            for name, value in sorted(outputs.items())}


def _loaded_or_404(name: str, version: int | None = None, label: str | None = None):
    _check_name(name)
    loaded = _loaded()
    # TF Serving's own messages: a version it does not serve, and a label it does not know
    # (no version labels are configured here).
    if label is not None:
        abort(404, f"Unrecognized servable version label: {label}")
    if loaded is None:
        abort(404, f"model {name!r} has no version loaded yet")
    if version is not None and version != loaded.version:
        abort(404, f"Servable not found for request: Specific({name}, {version})")
    return loaded


V1 = ["/v1/models/<model:name>", "/v1/models/<model:name>/versions/<int:version>",
      "/v1/models/<model:name>/labels/<model:label>"]


def _v1_routes(method, suffix=""):
    def register(view):
        for i, rule in enumerate(V1):
            getattr(tfserving_rest, method)(rule + suffix, endpoint=f"{view.__name__}_{i}")(view)
        return view
    return register


@_v1_routes("get")
def v1_status(name, version=None, label=None):
    loaded = _loaded_or_404(name, version, label)
    return jsonify(model_version_status=[{"version": str(loaded.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}])


@_v1_routes("get", "/metadata")
def v1_metadata(name, version=None, label=None):
    loaded = _loaded_or_404(name, version, label)
    defs = _predictor().backend.signature_defs(loaded.version)
    # TF Serving writes the protos as JSON with their field names and every field, defaults too;
    # sorted, since a proto map's order is arbitrary and both backends must give the same bytes.
    signature_def = {key: json.loads(json_format.MessageToJson(
        value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, sort_keys=True))
        for key, value in sorted(defs.items())}
    return jsonify(model_spec={"name": name, "signature_name": "", "version": str(loaded.version)},
                   metadata={"signature_def": {"signature_def": signature_def}})


@_v1_routes("post", ":predict")
def v1_predict(name, version=None, label=None):
    if version is None and label is None:
        _check_name(name)  # nothing loaded yet is the backend's 503, as for any predict
    else:
        _loaded_or_404(name, version, label)
    body = _body(schemas.PredictRequest)
    by_bytes = body.signature_name == BYTES_SIGNATURE
    if body.signature_name not in (None, SIGNATURE, BYTES_SIGNATURE):
        raise BadInput(f"unknown signature_name {body.signature_name!r}; use {SIGNATURE} or {BYTES_SIGNATURE}")
    expected = BYTES_INPUT if by_bytes else INPUT
    if body.instances is not None:
        where, values = "instances", body.instances
    elif isinstance(body.inputs, dict):
        if set(body.inputs) != {expected}:
            raise BadInput(f"inputs: expected exactly one input, named {expected!r}")
        where, values = f"inputs.{expected}", body.inputs[expected]
    else:
        where, values = "inputs", body.inputs
    if not isinstance(values, list) or not values:
        raise BadInput(f"{where}: must be a non-empty list of images")
    columnar = body.instances is None
    if by_bytes:
        limit = current_app.extensions["settings"].max_instances
        if len(values) > limit:
            raise BadInput(f"{len(values)} images in one request; at most {limit}")
        encoded = [images.encoded(x, f"{where}[{i}]") for i, x in enumerate(values)]
        del body, values
        answered, served = _predictor().backend.predict_bytes(encoded)
    else:
        batch = np.stack([images.instance(x, f"{where}[{i}]") for i, x in enumerate(values)])
        del body, values  # thousands of small lists: not kept alive while the request waits for its batch
        answered, served = _predictor().predict(batch)
    if version is not None and served.version != version:  # swapped while this request waited
        abort(404, f"Servable not found for request: Specific({name}, {version})")
    outputs = {k: v.tolist() for k, v in _outputs(answered).items()}
    headers = {"X-Model-Version": str(served.version)}
    # TF Serving answers a signature with one output by its bare values, and several by name.
    if len(outputs) == 1:
        (values,) = outputs.values()
        return jsonify({"outputs" if columnar else "predictions": values}), 200, headers
    if columnar:
        return jsonify(outputs=outputs), 200, headers
    predictions = [{k: v[i] for k, v in outputs.items()} for i in range(len(outputs["probabilities"]))]
    return jsonify(predictions=predictions), 200, headers


# --- Open Inference Protocol v2 -------------------------------------------------

@v2.get("/v2/health/live")
def v2_live():
    return jsonify(live=True)


@v2.get("/v2/health/ready")
def v2_ready():
    ready = _loaded() is not None and not current_app.extensions["draining"].is_set()
    return jsonify(ready=ready), 200 if ready else 503


@v2.get("/v2")
def v2_server():
    return jsonify(name="cifar10-pipeline", version=SERVER_VERSION, extensions=["binary_tensor_data"])


def _v2_loaded(name: str, version: str | None):
    """The model as loaded, or a 404 when a version is asked for that is not the one loaded."""
    _check_name(name)
    loaded = _loaded()
    if version is not None and (loaded is None or version != str(loaded.version)):
        abort(404, f"model {name!r} version {version} is not loaded")
    return loaded


@v2.get("/v2/models/<model:name>")
@v2.get("/v2/models/<model:name>/versions/<version>")
def v2_metadata(name, version=None):
    loaded = _v2_loaded(name, version)
    if loaded is None:
        raise Unavailable(f"model {name!r} has no version loaded yet")
    signature = _predictor().backend.signature_defs(loaded.version)[SIGNATURE]

    def tensors(infos):
        return [{"name": key, "datatype": V2_FROM_TF.get(info.dtype, f"TF_DTYPE_{info.dtype}"),
                 "shape": [d.size for d in info.tensor_shape.dim]} for key, info in sorted(infos.items())]

    return jsonify(name=name, versions=[str(loaded.version)], platform="tensorflow_savedmodel",
                   inputs=tensors(signature.inputs), outputs=tensors(signature.outputs))


@v2.get("/v2/models/<model:name>/ready")
@v2.get("/v2/models/<model:name>/versions/<version>/ready")
def v2_model_ready(name, version=None):
    ready = _v2_loaded(name, version) is not None
    return jsonify(name=name, ready=ready), 200 if ready else 503


# An answer's arrays (numpy dtypes; strings are objects) as v2 datatypes.
V2_DATATYPES = {"float32": "FP32", "int64": "INT64", "object": "BYTES"}
# A SignatureDef's dtypes (tensorflow/core/framework/types.proto's numbers) as v2 datatypes.
V2_FROM_TF = {1: "FP32", 2: "FP64", 3: "INT32", 4: "UINT8", 7: "BYTES", 9: "INT64", 10: "BOOL", 19: "FP16"}


def _binary(values: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":  # the extension's layout: each element's length (uint32 LE), then its bytes
        return b"".join(len(b).to_bytes(4, "little") + b for b in (v.encode() for v in values))
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


@v2.post("/v2/models/<model:name>/infer")
@v2.post("/v2/models/<model:name>/versions/<version>/infer")
def v2_infer(name, version=None):
    _v2_loaded(name, version)
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
        values = images.pixels(tensor.data, f"input {INPUT!r}").reshape(-1)
        if values.size != count:
            raise BadInput(f"input {INPUT!r}: {values.size} values for shape {shape}")
        batch = values.reshape(shape)
    answered, loaded = _predictor().predict(batch)
    if version is not None and version != str(loaded.version):  # swapped while this request waited
        abort(404, f"model {name!r} version {version} is not loaded")
    outputs = _outputs(answered)
    requested = body.outputs or [schemas.V2Output(name=out) for out in outputs]
    unknown = [o.name for o in requested if o.name not in outputs]
    if unknown:
        raise BadInput(f"unknown output {unknown[0]!r}; the model has {', '.join(outputs)}")
    binary_default = (body.parameters or {}).get("binary_data_output", False)
    answer = {"model_name": name, "model_version": str(loaded.version), "outputs": []}
    if body.id is not None:
        answer["id"] = body.id
    payload = b""
    for requested_output in requested:
        values = outputs[requested_output.name]
        datatype = V2_DATATYPES.get(values.dtype.name, "BYTES")
        out = {"name": requested_output.name, "datatype": datatype, "shape": list(values.shape)}
        if (requested_output.parameters or {}).get("binary_data", binary_default) is True:
            data = _binary(values.reshape(-1), datatype)
            out["parameters"] = {"binary_data_size": len(data)}
            payload += data
        else:
            out["data"] = values.reshape(-1).tolist()
        answer["outputs"].append(out)
    if not payload:
        return jsonify(answer)
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
    answered, loaded = _predictor().predict(images.decode(data)[None])
    probabilities = answered["probabilities"]
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
    return jsonify(openapi_document.document(current_app))


@pages.get("/docs")
def docs():
    return pages.send_static_file("docs.html")

