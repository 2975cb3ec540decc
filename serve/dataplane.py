"""What every protocol's views ask of the service, whatever their wire
format (KServe's DataPlane): the predictor, whether a model name is the one
served, whether it is ready, a body checked against its pydantic model."""

from __future__ import annotations

from flask import abort, current_app, request
from pydantic import BaseModel, ValidationError

from common.images import BadInput
from serve.predictor import Predictor


def predictor() -> Predictor:
    return current_app.extensions["predictor"]


def loaded():
    """The version the service answers with; None before there is one."""
    return predictor().backend.status()


def check_name(name: str) -> None:
    expected = current_app.extensions["settings"].name
    if name != expected:
        abort(404, f"no model named {name!r}; this service serves {expected!r}")


def ready() -> bool:
    return loaded() is not None and not current_app.extensions["draining"].is_set()


def json_body():
    """The request's JSON, or a 400. Not cached on the request: a body of thousands
    of small lists need not stay alive while the request waits for its batch."""
    try:
        data = request.get_json(silent=True, cache=False)
    except RecursionError:  # `silent` only covers ValueError; JSON nested ~1000 deep ends here
        data = None
    if data is None:
        raise BadInput("the body must be JSON (Content-Type: application/json)")
    return data


def validated(model: type[BaseModel], data):
    """`data` as `model`, or a 400 that says where in the body, and what is wrong there."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadInput(f"{where}: {first['msg']}") from None
