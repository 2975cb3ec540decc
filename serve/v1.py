"""TF Serving's REST API (v1): model status, metadata and predict, answered
exactly as TF Serving answers them for the same SavedModel."""

from __future__ import annotations

import json

import numpy as np
from flask import Blueprint, abort, jsonify
from google.protobuf import json_format

from common.images import BadInput
from common.layout import BYTES_INPUT, BYTES_SIGNATURE, INPUT, SIGNATURE
from common.redact import redact_data
from serve import dataplane, deadline, images, schemas

bp = Blueprint("tfserving_rest", __name__)

RULES = ["/v1/models/<model:name>", "/v1/models/<model:name>/versions/<version:version>",
         "/v1/models/<model:name>/labels/<model:label>"]


def decode(data) -> tuple[np.ndarray | list[bytes], bool]:
    """A predict body (parsed JSON) -> the images and whether it is columnar. The images are
    uint8 [N, 32, 32, 3], or for predict_image_bytes the encoded files, which the model decodes."""
    deadline.check("decoding the body")
    body = dataplane.validated(schemas.PredictRequest, data)
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
    if by_bytes:
        return [images.encoded(x, f"{where}[{i}]") for i, x in enumerate(values)], body.instances is None
    return np.stack([images.instance(x, f"{where}[{i}]") for i, x in enumerate(values)]), body.instances is None


def encode(outputs: dict[str, np.ndarray], columnar: bool) -> dict:
    """The predict answer: TF Serving answers a signature with one output by its bare
    values, and several by name, per instance (row format) or per output (columnar)."""
    lists = {k: v.tolist() for k, v in outputs.items()}
    if len(lists) == 1:
        (values,) = lists.values()
        return {"outputs" if columnar else "predictions": values}
    if columnar:
        return {"outputs": lists}
    count = len(next(iter(lists.values())))
    return {"predictions": [{k: v[i] for k, v in lists.items()} for i in range(count)]}


def encode_metadata(name: str, version: int, signature_defs: dict) -> dict:
    # TF Serving writes the protos as JSON with their field names and every field, defaults too;
    # sorted, since a proto map's order is arbitrary and both backends must give the same bytes.
    signature_def = {key: json.loads(json_format.MessageToJson(
        value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, sort_keys=True))
        for key, value in sorted(signature_defs.items())}
    return {"model_spec": {"name": name, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": signature_def}}}


def _loaded_or_404(name: str, version: int | None = None, label: str | None = None):
    dataplane.check_name(name)
    loaded = dataplane.loaded()
    # TF Serving's own messages: a version it does not serve, and a label it does not know
    # (no version labels are configured here).
    if label is not None:
        abort(404, f"Unrecognized servable version label: {label}")
    if loaded is None:
        abort(404, f"model {name!r} has no version loaded yet")
    if version is not None and version != loaded.version:
        abort(404, f"Servable not found for request: Specific({name}, {version})")
    return loaded


def _routes(method, suffix=""):
    """`view` on each of the three forms of a model's rule: bare, by version, by label."""
    def register(view):
        for i, rule in enumerate(RULES):
            getattr(bp, method)(rule + suffix, endpoint=f"{view.__name__}_{i}")(view)
        return view
    return register


@_routes("get")
def v1_status(name, version=None, label=None):
    loaded = _loaded_or_404(name, version, label)
    return jsonify(model_version_status=[{"version": str(loaded.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}])


@_routes("get", "/metadata")
def v1_metadata(name, version=None, label=None):
    loaded = _loaded_or_404(name, version, label)
    return jsonify(encode_metadata(name, loaded.version, dataplane.predictor().backend.signature_defs(loaded.version)))


@_routes("get", "/card")
def v1_card(name, version=None, label=None):
    """An extension of TF Serving's API: the served version's model card, as the job wrote it."""
    loaded = _loaded_or_404(name, version, label)
    try:
        card = dataplane.predictor().backend.card(loaded.version)
    except LookupError as exc:
        abort(404, str(exc))
    # The job redacted it; a card written by hand or by an older job is held to the same rule.
    return jsonify(redact_data(card)), 200, {"X-Model-Version": str(loaded.version)}


@_routes("post", ":predict")
def v1_predict(name, version=None, label=None):
    if version is None and label is None:
        dataplane.check_name(name)  # nothing loaded yet is the backend's 503, as for any predict
    else:
        _loaded_or_404(name, version, label)
    inputs, columnar = decode(dataplane.json_body())
    answered, served = dataplane.predictor().predict(inputs)
    if version is not None and served.version != version:  # swapped while this request waited
        abort(404, f"Servable not found for request: Specific({name}, {version})")
    return jsonify(encode(answered, columnar)), 200, {"X-Model-Version": str(served.version)}
