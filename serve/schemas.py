"""Request and response bodies as pydantic models: the single source of the
OpenAPI document, and the validation of each JSON envelope."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(Strict):
    """TF Serving REST: row format (`instances`) or columnar (`inputs`), one of them."""

    instances: list[Any] | None = Field(
        None, description='each a 32x32x3 nested list of 0-255 numbers, or {"b64": "<PNG/JPEG>"}', min_length=1)
    inputs: Any = Field(None, description='the images as a list, or {"images": [...]}')
    signature_name: str | None = None

    @model_validator(mode="after")
    def _one_format(self):
        if (self.instances is None) == (self.inputs is None):
            raise ValueError('send exactly one of "instances" (row format) or "inputs" (columnar format)')
        return self


class Prediction(BaseModel):
    class_id: int
    label: str
    probabilities: list[float] = Field(min_length=10, max_length=10)


class Outputs(BaseModel):
    class_id: list[int]
    label: list[str]
    probabilities: list[list[float]]


class PredictResponse(BaseModel):
    predictions: list[Prediction] | None = Field(None, description="row format: one object per instance")
    outputs: Outputs | None = Field(None, description="columnar format: each output for the whole batch")


class TopClass(BaseModel):
    label: str
    class_id: int
    probability: float


class UploadResponse(BaseModel):
    model_version: int
    predictions: list[TopClass] = Field(description="the top 5 classes, most likely first")


class V2Tensor(Strict):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V2Output(Strict):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(Strict):
    id: str | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2Output] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class Error(BaseModel):
    error: str


class Health(BaseModel):
    status: Literal["ok", "ready", "not ready"]
    model: str | None = None
    version: int | None = None


def openapi(model_name: str) -> dict:
    models = [PredictRequest, PredictResponse, UploadResponse, V2InferRequest, V2InferResponse, Error, Health]
    schemas = {}
    for m in models:
        schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[m.__name__] = schema

    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(name, description="OK"):
        return {"description": description, "content": {"application/json": {"schema": ref(name)}}}

    errors = {str(code): answer("Error", text) for code, text in
              [(400, "malformed request"), (401, "missing or wrong API key"), (404, "no such model"),
               (413, "body too large"), (503, "no model loaded, or at capacity (see Retry-After)"),
               (504, "timed out")]}
    name = model_name
    return {
        "openapi": "3.1.0",
        "info": {"title": "cifar10-pipeline prediction service", "version": "1"},
        "paths": {
            "/healthz": {"get": {"summary": "the process is alive", "responses": {"200": answer("Health")}}},
            "/readyz": {"get": {"summary": "a model is loaded",
                                "responses": {"200": answer("Health"), "503": answer("Health", "not ready")}}},
            f"/v1/models/{name}:predict": {"post": {
                "summary": "TF Serving REST predict (also under /versions/{version} and /labels/{label})",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("PredictRequest")}}},
                "responses": {"200": answer("PredictResponse"), **errors}}},
            "/v2": {"get": {"summary": "Open Inference Protocol v2 server metadata: name, version, extensions",
                            "responses": {"200": {"description": "OK"}}}},
            f"/v1/models/{name}": {"get": {"summary": "TF Serving model status", "responses": {"200": {
                "description": "OK"}}}},
            f"/v1/models/{name}/metadata": {"get": {"summary": "TF Serving model metadata", "responses": {
                "200": {"description": "OK"}}}},
            f"/v2/models/{name}/infer": {"post": {
                "summary": "Open Inference Protocol v2 infer, also under /versions/{version} (JSON; the binary "
                           "tensor extension for inputs, and for outputs by binary_data or binary_data_output)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("V2InferRequest")}}},
                "responses": {"200": answer("V2InferResponse"), **errors}}},
            "/predict": {"post": {
                "summary": "classify one uploaded image (PNG or JPEG, any size)",
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": answer("UploadResponse"), **errors}}},
            "/ping": {"get": {"summary": "SageMaker's health check: a model is loaded",
                              "responses": {"200": answer("Health"), "503": answer("Health", "not ready")}}},
            "/invocations": {"post": {
                "summary": "SageMaker inference: a TF Serving predict body, or an image as /predict takes",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": ref("PredictRequest")},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": {"description": "as the TF Serving predict route (JSON) or /predict (images)"},
                              **errors, "415": answer("Error", "unsupported Content-Type")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK"}}}},
        },
        "components": {"schemas": schemas},
    }
