"""What probes and scrapers read: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from serve import dataplane, metrics

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    name, loaded = current_app.extensions["settings"].name, dataplane.loaded()
    draining = current_app.extensions["draining"].is_set()
    if loaded is not None and not draining:
        return jsonify(status="ready", model=name, version=loaded.version)
    # Readiness may wait on the backend's rollout checks (a pinned version not
    # there yet, refused versions), on a model store it cannot read, or on a
    # shutdown: the body says which, for whoever looks at a pod that never
    # becomes ready.
    if draining:
        reason = "shutting down: finishing what was already sent"
    else:
        reason = getattr(dataplane.predictor().backend, "waiting_for", None)
    return jsonify(status="not ready", model=name, **({"reason": reason} if reason else {})), 503


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
