"""An HTTP proxy in front of the S3 test server that answers chosen requests
itself, as a throttled, failing or refusing S3 would; everything else goes
through unchanged. Shared by the test modules that need S3 to misbehave."""

from __future__ import annotations

import http.client
import http.server
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

# The hop-by-hop headers a proxy must not pass on, and those it recomputes.
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


@dataclass
class Fault:
    """Answer `status` with S3 error `code` to requests whose method and path
    match, for `seconds` from the first that matched (None: for ever)."""

    method: str
    path: str
    status: int
    code: str
    seconds: float | None = None
    started: float | None = None
    answered: int = 0

    def applies(self, method: str, path: str) -> bool:
        if not (re.fullmatch(self.method, method) and re.search(self.path, path)):
            return False
        now = time.monotonic()
        self.started = self.started or now
        return self.seconds is None or now - self.started < self.seconds


class S3Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream).netloc
        self.faults: list[Fault] = []
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def fail(self, method: str, path: str, status: int = 503, code: str = "SlowDown",
             seconds: float | None = None) -> Fault:
        fault = Fault(method, path, status, code, seconds)
        self.faults.append(fault)
        return fault

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue as botocore sends it
    server: S3Proxy

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if not size:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _DROPPED:
                self.send_header(name, value)
        # A HEAD answer's length is the object's, not that of the empty body.
        length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        fault = next((f for f in self.server.faults if f.applies(self.command, self.path)), None)
        if fault is not None:
            fault.answered += 1
            xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                   f"<Message>injected by the test proxy</Message></Error>").encode()
            self._answer(fault.status, [("Content-Type", "application/xml")], xml)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED | {"expect"}}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            self._answer(response.status, response.getheaders(), response.read())
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
