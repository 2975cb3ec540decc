"""The one rule for what never leaves a process: a URL's user and password,
and the query parameters that make a presigned URL a credential. Every log
line, error message, open route, model card, saved config, `check-config`
print and `submit --dry-run` job definition passes through `redact`.

It works on any text, not just on URIs: botocore's and urllib's errors quote
the URL they failed on inside a longer message, and a traceback or a YAML
dump holds URLs among other things."""

from __future__ import annotations

import logging
import re

HIDDEN = "***"
# S3 (SigV4 and SigV2), GCS and Azure SAS signatures and their session tokens. Names
# are matched whole and without case: `X-Amz-Signature`, `x-amz-signature`.
SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                 "x-goog-credential", "signature", "sig", "token")

# scheme://user[:password]@ : everything between the scheme and the last '@' before the host.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s\"'<>]+@")
_NAMES = "|".join(map(re.escape, SECRET_PARAMS))
_PARAM = re.compile(rf"(?P<name>[?&;](?:{_NAMES})=)[^&;#\s\"'<>]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL's userinfo and every secret query parameter's value replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
    return _PARAM.sub(lambda m: f"{m['name']}{HIDDEN}", text)


def without_query(uri: str) -> str:
    """`uri` without its query string and fragment (and redacted): for names derived from a
    URI, such as a cache file's, which need not carry anything after the path."""
    return redact(re.split(r"[?#]", uri, maxsplit=1)[0])


def redact_data(value):
    """Every string in a structure of dicts, lists and tuples redacted: a config or a model card."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value


class Filter(logging.Filter):
    """Redacts a record's message and traceback before any handler formats it. Attach it to
    handlers (a logger's filters do not see records propagated from its children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        # Formatters that format exc_info again (python-json-logger's) see only the redacted text.
        record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """The filter on every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, Filter) for f in handler.filters):
            handler.addFilter(Filter())
