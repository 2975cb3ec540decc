"""What a person uses: the page that classifies an uploaded image, the
upload route behind it, and Swagger UI for the OpenAPI document."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request
from markupsafe import escape

from common.images import BadInput
from serve import dataplane, images

bp = Blueprint("pages", __name__, static_folder="static")
# Swagger UI's dist files as the swagger-ui-py wheel ships them (its framework glue unused), under /docs/;
# nested in the pages so that registering the pages brings them.
swagger_ui = Blueprint("docs", __name__, static_url_path="/docs",
                       static_folder=Path(find_spec("swagger_ui").submodule_search_locations[0]) / "static")
bp.register_blueprint(swagger_ui)

IMAGE_TYPES = ("image/png", "image/jpeg")
UPLOAD_TYPES = (*IMAGE_TYPES, "multipart/form-data")


def decode(mimetype: str, data: bytes | None) -> np.ndarray:
    """An upload (its Content-Type; the image's bytes, None if absent) -> uint8 [1, 32, 32, 3]."""
    if mimetype not in UPLOAD_TYPES or data is None:
        raise BadInput('send the image as multipart field "file", or as an image/png or image/jpeg body')
    return images.decode(data)[None]


def encode(probabilities: np.ndarray, labels: tuple[str, ...], version: int) -> dict:
    """One image's probabilities -> the top 5 classes, most likely first."""
    order = np.argsort(-probabilities)[:5]
    top = [{"label": labels[i], "class_id": int(i), "probability": float(probabilities[i])} for i in order]
    return {"model_version": version, "predictions": top}


@bp.post("/predict")
def predict_upload():
    if request.mimetype == "multipart/form-data":
        file = request.files.get("file")
        data = file.read() if file else None
    else:  # any other type is refused unread
        data = request.get_data() if request.mimetype in IMAGE_TYPES else None
    answered, loaded = dataplane.predictor().predict(decode(request.mimetype, data))
    return jsonify(encode(answered["probabilities"][0], loaded.labels, loaded.version))


@bp.get("/")
def index():
    settings = current_app.extensions["settings"]
    page = (Path(bp.static_folder) / "index.html").read_text()
    # The model's name, for the card route the page reads; the key's need, before a 401 shows it.
    marks = f' data-model="{escape(settings.name)}"' + (" data-api-key-required" if settings.api_keys else "")
    return Response(page.replace("<body>", f"<body{marks}>", 1), content_type="text/html; charset=utf-8")


@bp.get("/docs")
def docs():
    return bp.send_static_file("docs.html")
