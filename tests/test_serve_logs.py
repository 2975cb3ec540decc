"""SERVE_LOG_FORMAT=json: every line the real service writes, from start to
shutdown, is one JSON object, and access lines carry the request's fields."""

import io
import json
import logging
import os
import signal
from datetime import datetime, timedelta

import pytest
import requests

from helpers import PROBE, ServeProcess
from serve import logs
from serve.backends import Loaded
from serve.settings import Settings


@pytest.mark.slow
def test_every_line_of_the_service_is_json_and_access_lines_carry_the_request(exported_model):
    service = ServeProcess("--model-uri", str(exported_model), "--workers", "1",
                           env={**os.environ, "SERVE_LOG_FORMAT": "json", "SERVE_POLL_SECONDS": "0.5"})
    proc, port, url, lines = service.proc, service.port, service.url, service.lines
    try:
        service.wait_ready(timeout=90)
        good = requests.post(f"{url}/v1/models/cifar10:predict", headers={"X-Request-ID": "abc"},
                             json={"instances": [PROBE[0].tolist()]})
        bad = requests.post(f"{url}/v1/models/cifar10:predict?x=1", headers={"X-Request-ID": "bad"},
                            json={"instances": 3})
        assert (good.status_code, bad.status_code) == (200, 400)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        service.stop(drain=True)

    records = []
    for stream, line in lines:
        record = json.loads(line)  # fails on any line that is not one JSON object
        assert {"time", "level", "logger", "message", "process"} <= record.keys(), line
        assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0), line
        records.append((stream, record))
    by_logger = {record["logger"] for _, record in records}
    assert {"serve", "gunicorn.error", "gunicorn.access"} <= by_logger
    settings = next(record["settings"] for _, record in records if "settings" in record)
    assert settings["log_format"] == "json" and settings["port"] == port and "api_keys" not in settings
    assert any("Shutting down" in record["message"] for _, record in records)

    access = {record.get("request_id"): (stream, record) for stream, record in records
              if record["logger"] == "gunicorn.access"}
    stream, line = access["abc"]
    assert stream == "stdout"  # as the text access lines: stdout; every other line on stderr
    assert {k: line[k] for k in ("method", "path", "status", "bytes", "remote")} == {
        "method": "POST", "path": "/v1/models/cifar10:predict", "status": 200, "bytes": len(good.content),
        "remote": "127.0.0.1"}
    assert 0 < line["duration_s"] < 60
    _, line = access["bad"]
    assert (line["status"], line["path"], line["query"], line["bytes"]) == (400, "/v1/models/cifar10:predict", "x=1",
                                                                            len(bad.content))
    assert all(stream == "stderr" for stream, record in records if record["logger"] != "gunicorn.access")


class Broken:
    """A backend with a bug: what the app answers with a bare 500 and logs with its traceback."""

    def predict(self, images):
        raise ZeroDivisionError("a bug")

    def status(self):
        return Loaded(1, None, ())

    def close(self):
        pass


def test_an_unhandled_errors_traceback_is_a_field_of_its_json_line(make_app):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.formatter())
    log = logging.getLogger("serve")
    log.addHandler(handler)
    try:
        client = make_app(Settings(model_uri="/nowhere/cifar10", max_batch_size=1), backend=Broken()).test_client()
        answer = client.post("/v1/models/cifar10:predict", headers={"X-Request-ID": "oops"},
                             json={"instances": PROBE[:1].tolist()})
    finally:
        log.removeHandler(handler)
    assert answer.status_code == 500 and "ZeroDivisionError" not in answer.text
    record = json.loads(out.getvalue())
    assert record["level"] == "ERROR" and record["logger"] == "serve" and "request_id=oops" in record["message"]
    assert record["traceback"].startswith("Traceback") and "ZeroDivisionError: a bug" in record["traceback"]
    assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)
