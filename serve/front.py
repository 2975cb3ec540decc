"""The buffering front: nginx reads every request whole before a gunicorn
thread sees it, so slow clients cost a connection in nginx, not a thread.

gunicorn's threaded worker holds a thread from a request's first byte to its
last, and a worker has `SERVE_THREADS` of them: 32 connections that trickle
their headers stopped a 2-worker service (docs/benchmarks.md, Slow clients).
gunicorn's deployment notes advise a buffering proxy in front of it, and
SageMaker's TF Serving container runs nginx in front of its gunicorn for
the same reason. Here nginx listens on the service's address, closes a
connection whose headers take longer than `SERVE_HEADER_TIMEOUT_S` or whose
body pauses longer than `SERVE_BODY_TIMEOUT_S`, refuses a body over
`SERVE_MAX_BODY_BYTES` (413, chunked or not), and passes each complete
request to gunicorn on a loopback socket this process opens.

`cifar-serve` stays the one process a container runs: it starts both, hands
SIGTERM (the drain) and SIGHUP to gunicorn, stops nginx once gunicorn has
finished, and stops gunicorn if nginx dies, so a platform restarts the whole.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from serve.settings import Settings

GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")
# Far above any honest load on one machine, and within the descriptors a container gets.
MAX_CONNECTIONS = 8192
# Bodies up to this size stay in nginx's memory; larger ones go to a temporary file, so
# a thousand slow uploads cost at most this much each.
BODY_BUFFER = "128k"
# Answers nginx gives itself, in the service's own error format.
ERRORS = {
    400: "the request is malformed",
    414: "the request line is too long",
    494: "a request header is too large",
    502: "the service is starting, restarting or shutting down; retry shortly",
    503: "the service is starting, restarting or shutting down; retry shortly",
    504: "no answer from the service in time",
}


def nginx() -> str | None:
    """nginx's path, where it is installed (Debian: /usr/sbin, not always on a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def config(settings: Settings, upstream_port: int, prefix: Path) -> str:
    """nginx's whole configuration for this service."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    connections = min(MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[1] // 2)
    errors = {**ERRORS, 413: f"the body is larger than {settings.max_body_bytes} bytes"}
    # Internal locations by URI: a named one cannot take a request whose line nginx refused (414).
    pages = "\n".join(f"        error_page {code} = /.error/{code};\n"
                      f"        location = /.error/{code} {{ internal; default_type application/json; "
                      f"return {503 if code == 502 else code} '{json.dumps({'error': text})}'; }}"
                      for code, text in errors.items())
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    # As root (a test, a VM) nginx's workers run as `nobody`, which must read the prefix.
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    return f"""# Written by cifar-serve (serve/front.py) at every start.
{user}
worker_processes 1;
worker_rlimit_nofile {2 * connections};
pid {prefix / "nginx.pid"};
daemon off;
error_log stderr error;
events {{ worker_connections {connections}; }}
http {{
    access_log off;  # gunicorn logs every request it answers, with its request id
    server_tokens off;
{temp}
    client_header_timeout {settings.header_timeout_s:g}s;
    client_body_timeout {settings.body_timeout_s:g}s;
    client_max_body_size {settings.max_body_bytes};
    client_body_buffer_size {BODY_BUFFER};
    send_timeout {settings.body_timeout_s:g}s;
    keepalive_timeout 5s;
    upstream service {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_timeout 4s;  # under gunicorn's 5 s, so gunicorn never closes one nginx is about to use
    }}
    server {{
        listen {host}:{settings.port} backlog=4096;
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout {settings.stuck_after_s}s;
            proxy_send_timeout {settings.stuck_after_s}s;
            # A kept-alive connection that a worker closed as it restarted (max_requests) or
            # drained is tried once more on a new one; predictions change nothing, so a POST
            # may be sent again. Not after a timeout: that is the deadline's answer.
            proxy_next_upstream error non_idempotent;
        }}
{pages}
    }}
}}
"""


# nginx's error_log line: "2026/12/08 01:00:00 [error] 7#7: *1 message"
NGINX_LINE = re.compile(r"^\S+ \S+ \[(?P<level>\w+)\] \d+#\d+: (?P<message>.*)$")


def _relay(stream) -> None:
    """nginx's log lines as the service's own (logger serve.nginx): in SERVE_LOG_FORMAT, and through
    common/redact.py's rule like every other line, since they quote the requests they are about."""
    log = logging.getLogger("serve.nginx")
    for line in stream:
        parsed = NGINX_LINE.match(line.rstrip("\n"))
        level, message = (parsed["level"], parsed["message"]) if parsed else ("error", line.rstrip("\n"))
        log.log(logging.WARNING if level in ("warn", "notice", "info") else logging.ERROR, "%s", message)


def _die_with_parent(sig: int):
    """A child that outlives `cifar-serve` (SIGKILL, OOM) gets `sig`, rather than holding the port."""
    def set_death_signal():
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    return set_death_signal


def run(settings: Settings) -> int:
    """Run nginx in front of gunicorn until gunicorn ends (or nginx dies); gunicorn's exit code."""
    prefix = Path(tempfile.mkdtemp(prefix="cifar-serve-front-"))
    prefix.chmod(0o755)
    # gunicorn's listening socket, opened here so nginx knows its port before gunicorn starts.
    upstream = socket.create_server(("127.0.0.1", 0), backlog=2048)
    (prefix / "nginx.conf").write_text(config(settings, upstream.getsockname()[1], prefix))
    args = f"{os.environ.get('GUNICORN_CMD_ARGS', '')} --bind fd://{upstream.fileno()}".strip()
    env = {**os.environ, "GUNICORN_CMD_ARGS": args, "SERVE_FRONT": "nginx"}
    children = {}
    try:
        proxy = subprocess.Popen([nginx(), "-e", "stderr", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                                 stderr=subprocess.PIPE, text=True, errors="replace",
                                 preexec_fn=_die_with_parent(signal.SIGTERM))
        relay = threading.Thread(target=_relay, args=(proxy.stderr,), name="nginx-log", daemon=True)
        relay.start()
        children[proxy.pid] = "nginx"
        # SIGINT, not SIGTERM: with nginx gone there is nobody left to drain for.
        service = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)], env=env,
                                   pass_fds=(upstream.fileno(),), preexec_fn=_die_with_parent(signal.SIGINT))
        children[service.pid] = "gunicorn"
    finally:
        upstream.close()  # gunicorn's alone now: once its workers close it, nothing accepts on it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, lambda sig, frame: service.send_signal(sig))
    try:
        while True:
            pid, status = os.wait()  # also reaps orphans, as a container's first process must
            if pid in children:
                break
        code = os.waitstatus_to_exitcode(status)
        if children[pid] == "nginx":
            logging.getLogger("serve").error("nginx exited (%s); stopping the service", code)
            service.terminate()
            service.wait()
            return code or 1
        # gunicorn has answered everything it took: nginx finishes what it holds and stops.
        proxy.send_signal(signal.SIGQUIT)
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
        return code
    finally:
        relay.join(timeout=5)  # nginx's last lines, written as it stopped
        shutil.rmtree(prefix, ignore_errors=True)
