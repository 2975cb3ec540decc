"""S3 (or MinIO, or anything that speaks S3) as both images reach it: one
client policy and one reading of an `s3://bucket/prefix` URI.

The client is configured only by boto3's own settings (`AWS_ENDPOINT_URL_S3`
or `AWS_ENDPOINT_URL`, the credential chain, the region) and this policy:

- retries: boto3's standard mode (bounded, with backoff, on throttling and
  connection errors), `AWS_MAX_ATTEMPTS` attempts in all, 5 unless set (as
  boto3 reads that variable, the first try counts: 1 means no retry);
- timeouts: 5 s to connect, 30 s per read, so a stalled endpoint cannot hang
  the job, the service's watcher or the sync sidecar for good;
- path-style addressing when a custom endpoint is set: MinIO and other
  self-hosted endpoints rarely have per-bucket DNS names.

boto3 is imported only when a client is made.
"""

from __future__ import annotations

import os
import threading

MAX_ATTEMPTS = 5
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 30

# The environment a client depends on: a change to any of them makes a new one.
SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
            "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS")

_clients: dict[tuple, object] = {}
_lock = threading.Lock()


def settings() -> tuple[str | None, ...]:
    """The current values of SETTINGS: what tells one client from another."""
    return tuple(os.environ.get(name) for name in SETTINGS)


def client():
    """The S3 client for the current settings, made once per set of them: clients are
    thread-safe, and making one costs tens of milliseconds (the service asks every few seconds)."""
    key = settings()
    # boto3's default session, which boto3.client uses, is not safe to set up from two threads at once.
    with _lock:
        if key not in _clients:
            _clients[key] = _make()
        return _clients[key]


def _make():
    import boto3
    from botocore.config import Config

    custom_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", "").strip() or str(MAX_ATTEMPTS)
    try:
        max_attempts = int(attempts)
    except ValueError:
        raise ValueError(f"AWS_MAX_ATTEMPTS={attempts!r}: expected a whole number of attempts") from None
    return boto3.client("s3", config=Config(
        # total_max_attempts is boto3's name for what AWS_MAX_ATTEMPTS means; its max_attempts counts retries only.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
        connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
    ))


def split(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b'): the bucket, and the key or prefix without its slashes."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")
