"""The OpenAPI document at /openapi.json, generated from the app's URL map,
the pydantic models of serve/schemas.py and one entry per view in ROUTES."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel

from serve.schemas import (
    Error,
    Health,
    ModelCard,
    PredictRequest,
    PredictResponse,
    UploadResponse,
    V1Metadata,
    V1Status,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2Metadata,
    V2ModelReady,
    V2Ready,
    V2Server,
)
from serve.settings import protected

bp = Blueprint("openapi", __name__)

# A body or an answer: a model (as JSON), or a schema (a model or a plain dict) per media type.
Body = type[BaseModel] | dict[str, Any] | None
BINARY = {"type": "string", "format": "binary"}
IMAGES = {"image/png": BINARY, "image/jpeg": BINARY}


class Op(NamedTuple):
    summary: str
    answer: Body = None
    body: Body = None
    errors: tuple[int, ...] = ()  # answered with Error
    not_ready: type[BaseModel] | None = None  # the 503 body of a route that answers its own model there


MODEL_ERRORS = (400, 404, 413, 503, 504)
# Keyed by view function: one entry serves every rule of that view (/readyz and /ping, the three v1 forms).
ROUTES = {
    "healthz": Op("the process is alive", Health),
    "readyz": Op("a model is loaded (/ping is SageMaker's name for it)", Health, not_ready=Health),
    "v1_status": Op("TF Serving model status", V1Status, errors=(404,)),
    "v1_metadata": Op("TF Serving model metadata, from the signatures", V1Metadata, errors=(404,)),
    "v1_card": Op("the served version's model card: its test metrics, config and lineage (commit, image, "
                  "job ids, data, creation time); an extension of TF Serving's API", ModelCard, errors=(404, 503)),
    "v1_predict": Op("TF Serving REST predict: row (instances) or columnar (inputs) format",
                     PredictResponse, PredictRequest, MODEL_ERRORS),
    "v2_server": Op("Open Inference Protocol v2 server metadata: name, version, extensions", V2Server),
    "v2_live": Op("v2: the server is live", V2Live),
    "v2_ready": Op("v2: a model is loaded", V2Ready, not_ready=V2Ready),
    "v2_metadata": Op("v2 model metadata, from the signature", V2Metadata, errors=(404, 503)),
    "v2_model_ready": Op("v2: this model (version) is loaded", V2ModelReady, errors=(404,), not_ready=V2ModelReady),
    "v2_infer": Op("v2 infer: JSON, or the binary tensor extension for inputs, and for outputs by binary_data "
                   "or binary_data_output (then the body is the JSON header, then the tensors' bytes)",
                   {"application/json": V2InferResponse, "application/octet-stream": BINARY},
                   {"application/json": V2InferRequest, "application/octet-stream": BINARY}, MODEL_ERRORS),
    "predict_upload": Op("classify one uploaded image (PNG or JPEG, any size): the top 5 classes", UploadResponse,
                         {"multipart/form-data": {"type": "object", "properties": {"file": BINARY},
                                                  "required": ["file"]}, **IMAGES}, (400, 413, 503, 504)),
    "invocations": Op("SageMaker inference: a TF Serving predict body, or an image as /predict takes, "
                      "answered as that route", {"application/json": {"anyOf": [PredictResponse, UploadResponse]}},
                      {"application/json": PredictRequest, **IMAGES}, (*MODEL_ERRORS, 415)),
    "index": Op("a page: upload an image and see the prediction", {"text/html": {"type": "string"}}),
    "prometheus": Op("Prometheus metrics", {"text/plain": {"type": "string"}}),
    "openapi": Op("this document", {"application/json": {"type": "object"}}),
    "docs": Op("Swagger UI for this document", {"text/html": {"type": "string"}}),
}
ERRORS = {400: "malformed request", 401: "missing or wrong API key", 404: "no such model, version, label or model card",
          413: "body too large", 415: "unsupported Content-Type",
          503: "no model loaded, or at capacity (see Retry-After)", 504: "no answer within the request timeout"}
PARAMETERS = {"name": "the model's name", "version": "a model version; only the one loaded answers",
              "label": "a version label (none are configured, so any is a 404 as in TF Serving)"}
# Flask's converters in a rule: `<name>`, `<version:version>`, `<model:name>`.
VARIABLE = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")


def is_static(endpoint: str) -> bool:
    """Flask's file routes (the app's and each blueprint's), which are not part of the API."""
    return endpoint.rsplit(".", 1)[-1] == "static"


def document(app: Flask) -> dict:
    """Every rule of the app's URL map that has an entry in ROUTES, with each method it answers."""
    settings = app.extensions["settings"]
    components: dict[str, Any] = {}

    def schema(of) -> dict:
        if isinstance(of, dict):
            return {key: [schema(x) for x in value] if key == "anyOf" else value for key, value in of.items()}
        generated = of.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(generated.pop("$defs", {}))
        components[of.__name__] = generated
        return {"$ref": f"#/components/schemas/{of.__name__}"}

    def content(body: Body) -> dict:
        by_type = body if isinstance(body, dict) else {"application/json": body}
        return {media: {"schema": schema(of)} for media, of in by_type.items()}

    def response(description: str, body: Body) -> dict:
        return {"description": description, **({"content": content(body)} if body is not None else {})}

    def parameter(converter: str | None, name: str) -> dict:
        if converter == "version":
            typed = {"type": "integer", "minimum": 0}
        else:
            typed = {"type": "string", "pattern": f"^{app.url_map.converters[converter or 'default'].regex}$"}
        # The served model's name is what "Try it out" sends.
        example = {"example": settings.name} if name == "name" else {}
        return {"name": name, "in": "path", "required": True, "description": PARAMETERS.get(name, name),
                "schema": typed, **example}

    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        op = ROUTES.get(app.view_functions[rule.endpoint].__name__)
        if is_static(rule.endpoint) or op is None:
            continue
        keyed = bool(settings.api_keys) and protected(rule.rule, rule.endpoint)
        responses = {"200": response("OK", op.answer)}
        for code in (*op.errors, *([401] if keyed else [])):
            responses[str(code)] = response(ERRORS[code], Error)
        if op.not_ready:
            responses["503"] = response("not ready", op.not_ready)
        operation = {"summary": op.summary, "tags": [rule.endpoint.split(".")[0]],
                     "parameters": [parameter(*v) for v in VARIABLE.findall(rule.rule)], "responses": responses}
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": content(op.body)}
        if keyed:
            operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
        path = paths.setdefault(VARIABLE.sub(r"{\2}", rule.rule), {})
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            path[method.lower()] = operation
    security = {"securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                    "Bearer": {"type": "http", "scheme": "bearer"}}} if settings.api_keys else {}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cifar10-pipeline prediction service", "version": "1"},
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items())), **security},
    }


@bp.get("/openapi.json")
def openapi():
    return jsonify(document(current_app))
