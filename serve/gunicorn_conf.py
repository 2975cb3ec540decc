"""gunicorn settings for `cifar-serve` (and `gunicorn -c serve/gunicorn_conf.py`).

One worker per core (at most 4, fewer where memory is short: serve/settings.py)
with many threads by default: the batched model is cheap, and what bounds
throughput is each request's Python, which one process runs on one core at
a time. The app is built in each worker
after fork (no preload), so TensorFlow is never loaded in the master, and
nowhere with SERVE_BACKEND=tfserving.
"""

import math
import os
import shutil
import tempfile

from serve import logs, rollout
from serve.settings import Settings

_settings = Settings()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "serve.workers.Worker"
threads = _settings.threads
preload_app = False
wsgi_app = "serve.app:create_app()"
# Model calls can take a while on a busy CPU; the per-request timeout is the app's.
timeout = _settings.stuck_after_s
# SIGTERM: each worker drains, then stops accepting and finishes what is in flight (serve/workers.py).
graceful_timeout = math.ceil(_settings.drain_seconds + _settings.graceful_timeout)
keepalive = 5
# nginx's own limit on a request line (8 KiB): one limit, so a long line gets one answer, in one format.
limit_request_line = 8190
accesslog = "-"
# Behind nginx (serve/front.py) the peer is always nginx: log the X-Forwarded-For chain it passes on,
# which ends with the address nginx saw.
_client = "%({x-forwarded-for}i)s" if _settings.front == "nginx" else "%(h)s"
access_log_format = _client + ' "%(r)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}o)s'
errorlog = "-"
if _settings.log_format == "text":
    # Also here, not only in cifar-serve: `gunicorn -c serve/gunicorn_conf.py` and the front start without it.
    logs.configure_text()
    logger_class = logs.Logger  # gunicorn's own handlers redact too
else:
    logs.configure()
    logconfig_dict, logger_class = logs.CONFIG, logs.AccessLogger


_made: list[str] = []


def on_starting(server):
    # Folders the workers share, made in the master (a worker's exit must not
    # take them with it) and fresh, so nothing of an earlier run is seen:
    # where they agree on the version they answer with (serve/rollout.py),
    # and where each counts for /metrics (unless a folder is given).
    os.environ["SERVE_STATE_DIR"] = _made_dir("cifar-serve-state-")
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made_dir("cifar-serve-metrics-")


def _made_dir(prefix: str) -> str:
    _made.append(tempfile.mkdtemp(prefix=prefix))
    return _made[-1]


def on_exit(server):
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)


def post_fork(server, worker):
    from serve import budget

    budget.return_freed_memory()  # before TensorFlow allocates anything
    if _settings.backend == "tfserving":  # a forwarder: TensorFlow is TF Serving's, not in this process
        return
    if not _settings.debug:
        from common.tfquiet import import_tensorflow_quietly

        import_tensorflow_quietly()
    if _settings.tf_threads:
        import tensorflow as tf

        # Only before the first op: TensorFlow sizes its pools once, when its runtime starts.
        tf.config.threading.set_intra_op_parallelism_threads(_settings.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(_settings.tf_threads)


def child_exit(server, worker):
    # A dead worker holds no switch back (a new one registers before it loads).
    rollout.worker_file(os.environ["SERVE_STATE_DIR"], worker.pid).unlink(missing_ok=True)
    # A dead worker's gauges leave the sums; its counters stay counted.
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
