"""The service's log as JSON lines (`SERVE_LOG_FORMAT=json`), for log
pipelines that index fields rather than parse text: every line, ours and
gunicorn's, is one object with `time` (ISO 8601, UTC), `level`, `logger`,
`message` and `process`; a traceback is a field; access lines carry the
request's own fields (`method`, `path`, `status`, `bytes`, `duration_s`,
`request_id`, `remote`) as keys. One dictConfig, applied by `cifar-serve` in
the master before gunicorn starts and again by gunicorn (`logconfig_dict`),
so the workers it forks inherit it.

In either format every handler, the service's and gunicorn's, passes each
line through common/redact.py's rule first."""

from __future__ import annotations

import logging.config
import os
import traceback

from gunicorn import glogging
from pythonjsonlogger.json import JsonFormatter

from common import redact


def formatter() -> JsonFormatter:
    return JsonFormatter(["levelname", "name", "message", "process"],
                         rename_fields={"levelname": "level", "name": "logger", "exc_info": "traceback"},
                         timestamp="time")  # the record's creation time as a UTC datetime, written in ISO 8601


# Where today's text lines go: access lines on stdout, everything else on stderr.
CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": formatter}},
    "filters": {"redact": {"()": redact.Filter}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
                   "filters": ["redact"]},
        "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout",
                   "filters": ["redact"]},
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
    },
}


# SERVE_LOG_FORMAT=text: gunicorn's own layout, for the service's lines beside gunicorn's.
TEXT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def configure_text() -> None:
    """Set in a gunicorn master, inherited by the workers it forks (a no-op where already set)."""
    logging.basicConfig(level=logging.INFO, format=TEXT)
    redact.install()


def configure() -> None:
    logging.config.dictConfig(CONFIG)
    # warnings.warn writes to stderr itself, past any formatter, unless routed through logging.
    logging.captureWarnings(True)


class Logger(glogging.Logger):
    """gunicorn's logger, its own lines and access lines through common/redact.py's rule
    like the service's: gunicorn gives them handlers of its own."""

    def setup(self, cfg):
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            redact.install(log)


class AccessLogger(Logger):
    """gunicorn's logger, whose access lines carry their fields as JSON keys
    rather than one string formatted by access_log_format."""

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        fields = {
            "method": atoms["m"],
            "path": redact.redact(atoms["U"]),
            # The rule knows a signing parameter by the `?` or `&` before it; redacted here, since the
            # Filter sees only the message, not these fields.
            "query": redact.redact(f"?{atoms['q']}")[1:],
            "status": int(atoms["s"]),
            "bytes": atoms["B"],
            "duration_s": request_time.total_seconds(),
            "request_id": atoms.get("{x-request-id}o"),  # set by the app, echoed in X-Request-ID
            # Behind nginx (serve/front.py, which sets SERVE_FRONT=nginx for gunicorn) the peer is
            # always nginx: the X-Forwarded-For chain it passes on ends with the address it saw.
            "remote": atoms["{x-forwarded-for}i"] if os.environ.get("SERVE_FRONT") == "nginx" else atoms["h"],
        }
        try:
            self.access_log.info("%s %s", atoms["r"], atoms["s"], extra=fields)
        except Exception:  # as gunicorn's own access(): a log line must never fail the request
            self.error(traceback.format_exc())
