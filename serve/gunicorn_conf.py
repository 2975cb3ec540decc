"""gunicorn settings for `cifar-serve` (and `gunicorn -c serve/gunicorn_conf.py`).

One worker per core (at most 4) with many threads by default: the batched
model is cheap, and what bounds throughput is each request's Python, which
one process runs on one core at a time. The app is built in each worker
after fork (no preload), so TensorFlow is never loaded in the master.
"""

import os

from serve.settings import Settings

_settings = Settings()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "gthread"
threads = _settings.threads
preload_app = False
wsgi_app = "serve.app:create_app()"
# Model calls can take a while on a busy CPU; the per-request timeout is the app's.
timeout = int(_settings.request_timeout_s) + 30
graceful_timeout = 30  # SIGTERM: stop accepting, finish in-flight requests
keepalive = 5
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}o)s'
errorlog = "-"


def post_fork(server, worker):
    if not _settings.debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _import_tensorflow_quietly()


def _import_tensorflow_quietly():
    """TensorFlow's C++ side writes its start-up lines (CUDA probes that read
    as failures on a CPU-only host, oneDNN notices) straight to file
    descriptor 2 before any log level applies; each worker loads it with
    stderr parked in a file, shown only if loading fails."""
    import sys
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as parked:
        os.dup2(parked.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            parked.seek(0)
            sys.stderr.buffer.write(parked.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def child_exit(server, worker):
    # A dead worker's gauges leave the sums; its counters stay counted.
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
