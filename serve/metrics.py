"""Prometheus metrics: requests and latency per route and status, batch
sizes, the model version served, failed attempts to load a newer one.
Every label value comes from a set known in advance (the app's routes or
"unmatched", HTTP's methods, statuses, reasons), so no request adds a series.

Under gunicorn with several workers, `cifar-serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh folder before forking them, and
`/metrics` adds up every worker's values (prometheus-client's multiprocess
mode) whichever worker answers the scrape.
"""

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

REQUESTS = Counter("cifar_serve_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram("cifar_serve_request_seconds", "HTTP request latency", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram("cifar_serve_batch_size", "images per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
# A version refused (damaged on storage, failing to load) or storage not answering: the
# previous version keeps serving, so nothing else shows it.
MODEL_REFRESH_FAILURES = Counter("cifar_serve_model_refresh_failures_total",
                                 "failed attempts to find or load a newer model version")
# Versions not served because a rollout check failed ("probe": answers differ from the
# export's record; "accuracy": below SERVE_MIN_ACCURACY) or their files cannot be served
# ("unloadable": unreadable, corrupt, missing), counted once per version.
MODEL_VERSIONS_REFUSED = Counter("cifar_serve_model_versions_refused_total",
                                 "model versions refused by a rollout check", ["reason"])
# Switches of the version the whole service answers with, counted once by the
# worker that made it: "forward" to a newer version, "back" to an older one.
MODEL_SWITCHES = Counter("cifar_serve_model_switches_total", "switches of the served model version",
                         ["direction"])
MODEL_VERSION = Gauge("cifar_serve_model_version", "the model version last used to answer",
                      multiprocess_mode="livemostrecent")


# HTTP's methods (RFC 9110 and PATCH). A client may send any token as one, and every
# label value is a series /metrics carries for as long as the service runs.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def bounded(method: str, status: int) -> tuple[str, str]:
    """The method and status as label values from known sets: anything else is `other`."""
    return (method if method in METHODS else "other",
            str(status) if 100 <= status <= 599 else "other")


def exposition() -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
