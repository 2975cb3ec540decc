"""`cifar-serve --model-uri URI [--port 8080]`: the service under gunicorn.

Flags become `SERVE_*` environment variables, which is where the settings
(and every gunicorn worker) read them from."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def sync_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cifar-serve sync",
                                     description="Mirror complete model versions into a folder TF Serving watches.")
    parser.add_argument("--from", dest="source", help="the model base: <export.uri>/<model_name>")
    parser.add_argument("--to", dest="dest", help="the local folder TF Serving's model_base_path is")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between checks (default 10)")
    parser.add_argument("--once", action="store_true", help="copy what is there now and exit")
    parser.add_argument("--heartbeat", type=Path, help="a file touched after each pass that reached the store")
    parser.add_argument("--check", type=Path, metavar="HEARTBEAT",
                        help="health check: exit 0 if the sync touched HEARTBEAT within --max-age seconds, else 1")
    parser.add_argument("--max-age", type=float, default=60.0, help="for --check (default 60)")
    args = parser.parse_args(argv)
    from serve import sync

    if args.check:
        problem = sync.stale(args.check, args.max_age)
        if problem:
            print(f"cifar-serve sync: unhealthy: {problem}", file=sys.stderr)
        return 1 if problem else 0
    if not (args.source and args.dest):
        parser.error("--from and --to are required (or --check)")
    import logging

    from common import redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    redact.install()
    try:
        sync.run(args.source, Path(args.dest), args.every, args.once, args.heartbeat)
    except Exception as exc:
        print(f"cifar-serve sync: error: {redact.redact(str(exc))}", file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sync"]:
        return sync_main(argv[1:])
    if argv[:1] == ["conformance"]:
        from serve import conformance

        return conformance.main(argv[1:])
    if argv[:1] == ["serve"]:  # how SageMaker starts an inference container: `docker run IMAGE serve`
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="cifar-serve", description="Serve the exported CIFAR-10 model over HTTP.",
                                     epilog="`cifar-serve sync --help`: mirror versions for TF Serving; "
                                            "`cifar-serve conformance --help`: check a server's TF Serving "
                                            "and v2 answers.")
    parser.add_argument("--model-uri", help="<export.uri>/<model_name>, local or s3:// (env SERVE_MODEL_URI)")
    parser.add_argument("--port", type=int, help="port (env SERVE_PORT, default 8080)")
    parser.add_argument("--host", help="address to bind (env SERVE_HOST, default 0.0.0.0)")
    parser.add_argument("--backend", choices=["inprocess", "tfserving"], help="env SERVE_BACKEND")
    parser.add_argument("--tfserving-address", help="host:port of TF Serving's gRPC API (env SERVE_TFSERVING_ADDRESS)")
    parser.add_argument("--workers", type=int,
                        help="gunicorn workers (env SERVE_WORKERS, default: one per CPU core, at most 4)")
    parser.add_argument("--threads", type=int, help="threads per worker (env SERVE_THREADS, default 16)")
    parser.add_argument("--debug", action="store_const", const=True,
                        help="keep TensorFlow's start-up and warning lines in the log (env SERVE_DEBUG)")
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="json: one JSON object per log line (env SERVE_LOG_FORMAT, default text)")
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if value is not None:
            os.environ[f"SERVE_{name.upper()}"] = str(value)

    from pydantic import ValidationError

    from serve.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors():
            print(f"cifar-serve: error: SERVE_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}", file=sys.stderr)
        return 2
    if settings.backend == "inprocess" and not settings.model_uri:
        print("cifar-serve: error: --model-uri (or SERVE_MODEL_URI) is required", file=sys.stderr)
        return 2
    from serve import front

    if settings.front == "nginx" and not front.nginx():
        print("cifar-serve: error: SERVE_FRONT: nginx is not installed (Debian's nginx-light package)",
              file=sys.stderr)
        return 2
    import logging

    if settings.log_format == "json":
        from serve import logs

        logs.configure()
        # Whether auth is on and with how many keys, never the keys.
        logging.getLogger("serve").info("cifar-serve settings", extra={"settings": settings.public()})
    else:
        print(f"cifar-serve: {json.dumps(settings.public(), separators=(',', ':'))}", file=sys.stderr, flush=True)
        from serve import logs

        logs.configure_text()
    log = logging.getLogger("serve")
    if settings.front != "none" and front.nginx():
        log.info("front: nginx reads every request whole (headers within %gs, no pause over %gs in a body) "
                 "before a worker sees it", settings.header_timeout_s, settings.body_timeout_s)
        return front.run(settings)
    log.warning("front: none: gunicorn reads requests itself, so a slow client holds a worker thread until it "
                "is done; install nginx, or put a buffering proxy in front (docs/operating.md, Threat model)")
    from gunicorn.app.wsgiapp import run

    sys.argv = ["gunicorn", "-c", os.path.join(os.path.dirname(__file__), "gunicorn_conf.py")]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
