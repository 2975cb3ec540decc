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
if _settings.log_format == "json":
    from serve import logs

    # Also here, not only in cifar-serve: `gunicorn -c serve/gunicorn_conf.py` starts without it.
    logs.configure()
    logconfig_dict, logger_class = logs.CONFIG, logs.AccessLogger


def post_fork(server, worker):
    if not _settings.debug:
        from common.tfquiet import import_tensorflow_quietly

        import_tensorflow_quietly()


def child_exit(server, worker):
    # A dead worker's gauges leave the sums; its counters stay counted.
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
