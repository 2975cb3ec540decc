"""The gunicorn worker: gunicorn's threaded one, with what a load balancer needs.

- It takes no connection until it holds the version the service answers
  with, or has found it cannot (serve/inprocess.py: `joined`). gunicorn's
  workers share one listening socket and the kernel hands a connection to
  whichever worker calls accept(); one still loading does not call it, so
  nothing is routed to it after a restart (`max_requests`, a crash). At start
  nothing is served yet, so it waits for nothing: whatever the model store
  holds (nothing, unreadable or corrupt versions, an S3 that does not
  answer), /healthz and /readyz answer as soon as TensorFlow is imported.
- On SIGTERM it drains: /readyz answers 503 at once while the worker keeps
  accepting and answering, each answer closing its connection, for
  SERVE_DRAIN_SECONDS; then gunicorn's own graceful stop lets requests in
  flight finish. A balancer that watches readiness stops sending before the
  socket closes, so no request it sent is refused.
"""

from __future__ import annotations

import threading

from gunicorn.workers.gthread import ThreadWorker


class Worker(ThreadWorker):
    def load_wsgi(self):
        super().load_wsgi()
        joined = getattr(self.wsgi.extensions["predictor"].backend, "joined", None)
        # gunicorn kills a worker that stops checking in for `timeout` seconds,
        # and a download may take longer than that.
        while joined is not None and self.alive and not joined.wait(1.0):
            self.notify()

    def handle_exit(self, sig, frame):
        app = getattr(self, "wsgi", None)
        draining = app.extensions["draining"] if app else None
        if draining is None:  # still starting: nothing to drain
            super().handle_exit(sig, frame)
            return
        if draining.is_set():
            return
        draining.set()
        self.cfg.set("keepalive", 0)  # gthread closes each connection after its answer
        seconds = app.extensions["settings"].drain_seconds
        self.log.info("draining: not ready, still answering for %gs", seconds)
        timer = threading.Timer(seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
