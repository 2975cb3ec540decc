"""Each request's deadline, SERVE_REQUEST_TIMEOUT_S after it started: reading,
decoding, queueing and the model all count. The app starts it for every
request (app.start_request); the work that can take long checks it between
steps, so a request past its deadline stops using the CPU and gets a 504."""

from __future__ import annotations

import time
from contextvars import ContextVar

# When the request on this thread must have its answer (time.monotonic()); None outside a request.
_deadline: ContextVar[float | None] = ContextVar("deadline", default=None)


class Expired(Exception):
    """The request's deadline passed: a 504, saying at what step. Not a TimeoutError, which is an
    OSError: image decoding takes those for a broken file."""


def start(seconds: float) -> None:
    _deadline.set(time.monotonic() + seconds)


def end() -> None:
    """No deadline after the request: a thread (a test's, gunicorn's) outlives its requests."""
    _deadline.set(None)


def at() -> float | None:
    """The deadline of the request on this thread, to hand to another thread; None outside a request."""
    return _deadline.get()


def remaining(deadline: float | None = None) -> float | None:
    """Seconds left before `deadline` (the request's own by default), at least 0; None without one."""
    deadline = _deadline.get() if deadline is None else deadline
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def check(step: str) -> None:
    """Raise Expired if the request's deadline has passed, naming the `step` it would have started."""
    if remaining() == 0:
        raise Expired(f"the deadline passed before {step}")
