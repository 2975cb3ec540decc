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


def test_the_rule_hides_userinfo_and_signing_parameters_and_keeps_the_rest():
    cases = {
        'Could not connect to the endpoint URL: "http://KEY:SECRET@minio:9000/cifar?list-type=2"':
            'Could not connect to the endpoint URL: "http://***@minio:9000/cifar?list-type=2"',
        "https://b.s3.amazonaws.com/d.tar.gz?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Date=1"
        "&X-Amz-Signature=abc&x-amz-security-token=zz":
            "https://b.s3.amazonaws.com/d.tar.gz?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Date=1"
            "&X-Amz-Signature=***&x-amz-security-token=***",
        "https://acc.blob.core.windows.net/c/f?sv=1&sig=abc%3D&se=2": "https://acc.blob.core.windows.net/c/f?sv=1&sig=***&se=2",
        "https://storage.googleapis.com/b/o?X-Goog-Signature=ff&x=1": "https://storage.googleapis.com/b/o?X-Goog-Signature=***&x=1",
        "http://u@h/p?token=1#frag": "http://***@h/p?token=***#frag",
        # Not credentials: a plain S3 URI, an e-mail address, a parameter that only ends in "sig".
        "s3://bucket/prefix/x": "s3://bucket/prefix/x",
        "mail ops@example.com": "mail ops@example.com",
        "https://h/p?config=1&design=2": "https://h/p?config=1&design=2",
    }
    for text, expected in cases.items():
        assert redact.redact(text) == expected
    assert redact.without_query("https://x/y.tar.gz?sig=1#f") == "https://x/y.tar.gz"
    assert redact.redact_data({"a": ["http://k:s@h/"], "b": 3}) == {"a": ["http://***@h/"], "b": 3}
