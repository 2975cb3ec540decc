"""SageMaker's endpoint contract: GET /ping, its health check, and POST
/invocations, its one inference route, where the Content-Type says which of
our formats the body is in: TF Serving's predict body, or an image as
/predict takes, each decoded and answered as on that route."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from serve import health, page, v1

bp = Blueprint("sagemaker", __name__)
# SageMaker reads only /ping's status: /readyz's answer serves.
bp.add_url_rule("/ping", view_func=health.readyz)


@bp.post("/invocations")
def invocations():
    if request.mimetype == "application/json":
        return v1.v1_predict(current_app.extensions["settings"].name)
    if request.mimetype in page.UPLOAD_TYPES:
        return page.predict_upload()
    return jsonify(error=f"unsupported Content-Type {request.mimetype or '(none)'!r}; send application/json "
                         "(TF Serving's predict body), image/png or image/jpeg"), 415
