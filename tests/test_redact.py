"""common/redact.py: what its Filter leaves of a secret in a log line, whichever formatter writes it."""

import io
import json
import logging

from common import redact
from serve import logs

URL = "http://KEYID:SECRETXYZ@127.0.0.1:9/bucket?X-Amz-Signature=SIGNED"


def test_a_traceback_is_redacted_in_text_and_in_json_lines():
    for formatter in (logging.Formatter("%(message)s"), logs.formatter()):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        handler.addFilter(redact.Filter())
        log = logging.Logger("redact-test")
        log.addHandler(handler)
        try:
            raise ValueError(f"could not reach {URL}")
        except ValueError:
            log.exception("listing %s failed", URL)
        text = out.getvalue()
        assert "SECRETXYZ" not in text and "SIGNED" not in text and "KEYID" not in text, text
        assert text.count("***@127.0.0.1") == 2, text  # the message and the traceback, both kept
        if isinstance(formatter, logs.JsonFormatter):
            assert "ValueError" in json.loads(text)["traceback"]
