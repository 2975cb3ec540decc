"""The Open Inference Protocol v2 (KServe, Triton): server and model
metadata, health, and infer, with the binary tensor data extension."""

from __future__ import annotations

import json
import math
from importlib.metadata import version as package_version

import numpy as np
from flask import Blueprint, Response, abort, jsonify, request

from common.images import BadInput
from common.layout import INPUT, SIGNATURE
from serve import dataplane, deadline, images, schemas
from serve.backends import Unavailable

bp = Blueprint("v2", __name__)
SERVER_VERSION = package_version("cifar10-pipeline")
# An answer's arrays (numpy dtypes; strings are objects) as v2 datatypes.
V2_DATATYPES = {"float32": "FP32", "int64": "INT64", "object": "BYTES"}
# A SignatureDef's dtypes (tensorflow/core/framework/types.proto's numbers) as v2 datatypes.
V2_FROM_TF = {1: "FP32", 2: "FP64", 3: "INT32", 4: "UINT8", 7: "BYTES", 9: "INT64", 10: "BOOL", 19: "FP16"}


def decode(raw: bytes, header_length: str | None) -> tuple[np.ndarray, schemas.V2InferRequest]:
    """An infer body and its Inference-Header-Content-Length -> uint8 [N, 32, 32, 3] and the request."""
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
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply, or a >4300-digit integer
        raise BadInput("the inference header must be JSON") from None
    deadline.check("decoding the body")
    body = dataplane.validated(schemas.V2InferRequest, data)
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
        return np.frombuffer(binary[:size], dtype=np.uint8).reshape(shape), body
    if tensor.data is None:
        raise BadInput(f"input {INPUT!r} has no data")
    values = images.pixels(tensor.data, f"input {INPUT!r}").reshape(-1)
    if values.size != count:
        raise BadInput(f"input {INPUT!r}: {values.size} values for shape {shape}")
    return values.reshape(shape), body


def encode(body: schemas.V2InferRequest, outputs: dict[str, np.ndarray], name: str,
           version: str) -> tuple[dict, bytes]:
    """The infer answer: its JSON, and the bytes of the outputs asked for as binary data
    (by binary_data, or binary_data_output), which follow the JSON in the body."""
    requested = body.outputs or [schemas.V2Output(name=out) for out in outputs]
    unknown = [o.name for o in requested if o.name not in outputs]
    if unknown:
        raise BadInput(f"unknown output {unknown[0]!r}; the model has {', '.join(outputs)}")
    binary_default = (body.parameters or {}).get("binary_data_output", False)
    answer = {"model_name": name, "model_version": version, "outputs": []}
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
    return answer, payload


def _binary(values: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":  # the extension's layout: each element's length (uint32 LE), then its bytes
        return b"".join(len(b).to_bytes(4, "little") + b for b in (v.encode() for v in values))
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


def encode_metadata(name: str, version: int, signature) -> dict:
    def tensors(infos):
        return [{"name": key, "datatype": V2_FROM_TF.get(info.dtype, f"TF_DTYPE_{info.dtype}"),
                 "shape": [d.size for d in info.tensor_shape.dim]} for key, info in sorted(infos.items())]

    return {"name": name, "versions": [str(version)], "platform": "tensorflow_savedmodel",
            "inputs": tensors(signature.inputs), "outputs": tensors(signature.outputs)}


def _loaded(name: str, version: int | None):
    """The model as loaded, or a 404 when a version is asked for that is not the one loaded."""
    dataplane.check_name(name)
    loaded = dataplane.loaded()
    if version is not None and (loaded is None or version != loaded.version):
        abort(404, f"model {name!r} version {version} is not loaded")
    return loaded


@bp.get("/v2/health/live")
def v2_live():
    return jsonify(live=True)


@bp.get("/v2/health/ready")
def v2_ready():
    ready = dataplane.ready()
    return jsonify(ready=ready), 200 if ready else 503


@bp.get("/v2")
def v2_server():
    return jsonify(name="cifar10-pipeline", version=SERVER_VERSION, extensions=["binary_tensor_data"])


@bp.get("/v2/models/<model:name>")
@bp.get("/v2/models/<model:name>/versions/<version:version>")
def v2_metadata(name, version=None):
    loaded = _loaded(name, version)
    if loaded is None:
        raise Unavailable(f"model {name!r} has no version loaded yet")
    signature = dataplane.predictor().backend.signature_defs(loaded.version)[SIGNATURE]
    return jsonify(encode_metadata(name, loaded.version, signature))


@bp.get("/v2/models/<model:name>/ready")
@bp.get("/v2/models/<model:name>/versions/<version:version>/ready")
def v2_model_ready(name, version=None):
    ready = _loaded(name, version) is not None
    return jsonify(name=name, ready=ready), 200 if ready else 503


@bp.post("/v2/models/<model:name>/infer")
@bp.post("/v2/models/<model:name>/versions/<version:version>/infer")
def v2_infer(name, version=None):
    _loaded(name, version)
    batch, body = decode(request.get_data(), request.headers.get("Inference-Header-Content-Length"))
    answered, loaded = dataplane.predictor().predict(batch)
    if version is not None and version != loaded.version:  # swapped while this request waited
        abort(404, f"model {name!r} version {version} is not loaded")
    answer, payload = encode(body, answered, name, str(loaded.version))
    if not payload:
        return jsonify(answer)
    header = json.dumps(answer).encode()
    return Response(header + payload, content_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
