"""What a backend is: where predictions come from, the SavedModel in this
process (serve/inprocess.py) or TF Serving over gRPC (serve/tfserving.py).
Both answer `predict(uint8 [N,32,32,3])` with the signature's outputs by name
(`probabilities`, `class_id`, `label`) and say which version they serve;
the Predictor (serve/predictor.py) chooses one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

class Unavailable(Exception):
    """No model to answer with (yet): a 503."""


class UpstreamError(Exception):
    """TF Serving failed; `status` is the HTTP status to answer with (502, 503 or 504)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Loaded:
    version: int
    predict: object  # the SavedModel's serving_default signature
    labels: tuple[str, ...]
    predict_bytes: object = None  # its predict_image_bytes signature, where the export has one
    signature_defs: dict | None = None  # name -> SignatureDef proto, as TF Serving reports them
    card: dict | None = None  # its model card (common/layout.py), where this process has read it


class Backend(Protocol):
    def predict(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], Loaded]:
        """uint8 [N,32,32,3] -> (output name -> [N,...], the version that answered); Unavailable without one."""

    def predict_bytes(self, encoded: list[bytes]) -> tuple[dict[str, np.ndarray], Loaded]:
        """Encoded images through the model's own decoding (predict_image_bytes)."""

    def signature_defs(self, version: int) -> dict:
        """name -> SignatureDef of `version`, as TF Serving's metadata reports them."""

    def card(self, version: int) -> dict:
        """`version`'s model card; LookupError saying why there is none to show."""

    def status(self) -> Loaded | None:
        """The version served now; None before there is one."""

    def close(self) -> None:
        """Stop watching for versions."""
