"""Flask's JSON, through orjson.

Parsing the body and writing the answer are most of what a prediction
request costs in Python (a 32x32x3 instance is 12 KB of JSON), and Python
holds one lock for all of it; orjson does both in a third of the time.
"""

from __future__ import annotations

import orjson
from flask.json.provider import DefaultJSONProvider


class OrjsonProvider(DefaultJSONProvider):
    def loads(self, s, **kwargs):
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            # NaN, Infinity and integers beyond 64 bits are refused by orjson
            # but read by Python's json, so that the 400 can name the value
            # rather than call the body not JSON; truly broken JSON fails both.
            return super().loads(s, **kwargs)

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # a type orjson does not know: Flask's own encoder knows more
            return super().response(obj)
        return self._app.response_class(body, mimetype=self.mimetype)
