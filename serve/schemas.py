"""Request and response bodies as pydantic models, which validate each JSON
envelope and describe it in the OpenAPI document (serve/openapi.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.card import Lineage


class ModelCard(BaseModel):
    """What the job recorded of the run that made a version (assets.extra/model_card.json); the keys
    beyond these are the run's own (its config, epochs, timings, ...)."""

    model_config = ConfigDict(extra="allow")

    test_accuracy: float | None = None
    data_checksum: str | None = None
    lineage: Lineage | None = Field(None, description="where the version came from; absent from versions "
                                                      "exported before the job recorded it")


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
    reason: str | None = Field(
        None, description="why it is not ready: a pinned version not there yet, refused versions, a shutdown")


class VersionStatus(BaseModel):
    version: str
    state: str
    status: dict[str, str]


class V1Status(BaseModel):
    model_version_status: list[VersionStatus]


class V1Metadata(BaseModel):
    model_spec: dict[str, str]
    metadata: dict[str, Any] = Field(
        description="every SignatureDef as the SavedModel holds it, as TF Serving writes it")


class V2Server(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2Metadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool
