"""The Flask application factory: cross-cutting concerns (request ids, API
keys, CORS, limits, metrics, errors) here; the routes in a module per
protocol (health, v1, v2, sagemaker, page, openapi).

Every error a client can cause is a 4xx with `{"error": "..."}`; anything
else is logged with its traceback and answered as a bare 500, never with
the traceback.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import io
import logging
import threading
import time
import uuid

import flask
from flask import Flask, current_app, g, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from common.images import BadInput
from common.redact import redact
from serve import backends, deadline, health, metrics, openapi, page, sagemaker, v1, v2
from serve.batching import Overloaded, request_ids
from serve.jsonio import OrjsonProvider
from serve.predictor import Predictor
from serve.settings import Settings, protected

log = logging.getLogger("serve")


# A multipart body's parts: /predict reads one, the file.
FORM_PARTS = 8


class ModelName(BaseConverter):
    regex = r"[^/:]+"


class Version(BaseConverter):
    """A model version in a URL, on every route that takes one: ASCII digits without leading
    zeros, as a version's folder is named. werkzeug's int converter also takes `01` and other
    scripts' digits (`１`) for 1."""

    regex = r"0|[1-9][0-9]{0,18}"  # within int64, as TF Serving's versions

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value) -> str:
        return str(value)


class FormTooLarge(RequestEntityTooLarge):
    """A multipart body within the size limit but past werkzeug's limits on its form."""


class Request(flask.Request):
    def _load_form_data(self):
        try:
            super()._load_form_data()
        except RequestEntityTooLarge:
            # The body's size was checked before anything read it (bound_body), so werkzeug's
            # bare 413 here is about the form's shape.
            raise FormTooLarge(f"too many parts or too large a field: a multipart body holds at most "
                               f"{self.max_form_parts} parts, and each field that is not a file at most "
                               f"{self.max_form_memory_size} bytes") from None


def create_app(settings: Settings | None = None, backend: backends.Backend | None = None) -> Flask:
    settings = settings or Settings()
    app = Flask(__name__)
    # Model names never hold ':' so that `GET /v1/models/x:predict` is a
    # wrong method on the predict route, not a request for a model "x:predict".
    app.url_map.converters["model"] = ModelName
    app.url_map.converters["version"] = Version
    app.request_class = Request
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_FORM_PARTS"] = FORM_PARTS
    app.json = OrjsonProvider(app)
    app.json.sort_keys = False
    app.extensions["predictor"] = Predictor(settings, backend)
    app.extensions["settings"] = settings
    app.extensions["draining"] = threading.Event()  # set on SIGTERM by serve/workers.py
    if settings.cors_origins:
        CORS(app, origins=settings.cors_origins, expose_headers=["X-Request-ID", "X-Model-Version"])
    for protocol in (health, v1, v2, sagemaker, page, openapi):
        app.register_blueprint(protocol.bp)
    app.before_request(start_request)
    app.before_request(check_api_key)
    app.before_request(bound_body)
    app.after_request(finish_request)
    app.teardown_request(lambda exc: deadline.end())
    for error, handler in ERROR_HANDLERS.items():
        app.register_error_handler(error, handler)
    return app


def start_request():
    g.started = time.perf_counter()
    deadline.start(current_app.extensions["settings"].request_timeout_s)  # reading the body counts too
    # A client's id is echoed in a header and the log: printable ASCII only, so it can split neither.
    given = "".join(c for c in request.headers.get("X-Request-ID", "")[:128] if " " < c < "\x7f")
    g.request_id = given or uuid.uuid4().hex
    request_ids.set((g.request_id,))  # for the model call, which may run on the batcher's thread


def check_api_key():
    """A 401 for a model route without one of SERVE_API_KEYS, when there are any."""
    keys = current_app.extensions["settings"].api_keys
    if not keys or not protected(request.path, request.endpoint) or request.method == "OPTIONS":
        return None
    given = request.headers.get("X-API-Key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    # Every key is compared, in constant time, as digests of one length: timing tells neither
    # which key is close nor how long one is.
    digest = _digest(given)
    if not any([hmac.compare_digest(digest, _digest(key)) for key in keys]):
        return jsonify(error="missing or wrong API key (send X-API-Key or Authorization: Bearer)"), 401
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bound_body():
    """A body over MAX_CONTENT_LENGTH is a 413, however it is framed. Sent chunked (no
    Content-Length), werkzeug reads it only up to the limit, under any server that says it
    ends the stream itself (gunicorn's wsgi.input_terminated), and stops there without a
    word: the view gets a cut body. So it is read here, one byte past the limit."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None:
        if request.content_length > limit:  # here, so that a 413 from parsing a form is about its shape
            raise RequestEntityTooLarge()
        return
    if "wsgi.input_terminated" not in request.environ:
        return  # werkzeug reads no body without a length from a server that does not end it
    body = request.environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise RequestEntityTooLarge()
    request.environ["wsgi.input"] = io.BytesIO(body)


def finish_request(response):
    response.headers["X-Request-ID"] = g.get("request_id", "")
    route = request.url_rule.rule if request.url_rule else "unmatched"
    metrics.REQUESTS.labels(route, *metrics.bounded(request.method, response.status_code)).inc()
    metrics.LATENCY.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
    # The access log line (with this request id) is gunicorn's: see gunicorn_conf.access_log_format.
    return response


def timed_out(exc):
    limit = f"no answer within {current_app.extensions['settings'].request_timeout_s:g}s"
    # deadline.Expired says at what step; a timeout of a future says nothing.
    return jsonify(error=f"{limit}: {exc}" if str(exc) else limit), 504


def http_error(exc):
    if type(exc) is RequestEntityTooLarge:  # werkzeug's own: the body's size, whatever its framing
        return jsonify(error=f"the body is larger than {current_app.extensions['settings'].max_body_bytes} "
                             "bytes"), 413
    return jsonify(error=redact(exc.description)), exc.code


def bug(exc):
    log.exception("unhandled error on %s %s (request_id=%s)", request.method, request.path, g.get("request_id"))
    return jsonify(error=f"internal error (request id {g.get('request_id')})"), 500


# Each exception as the answer a client gets; Flask picks the most specific class.
ERROR_HANDLERS = {
    BadInput: lambda exc: (jsonify(error=redact(str(exc))), 400),
    Overloaded: lambda exc: (jsonify(error=redact(str(exc))), 503, {"Retry-After": "1"}),
    backends.Unavailable: lambda exc: (jsonify(error=redact(str(exc))), 503, {"Retry-After": "5"}),
    backends.UpstreamError: lambda exc: (jsonify(error=redact(str(exc))), exc.status),
    concurrent.futures.TimeoutError: timed_out,
    deadline.Expired: timed_out,
    HTTPException: http_error,
    Exception: bug,
}
