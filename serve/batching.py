"""Server-side micro-batching, with TF Serving's semantics: requests that
arrive together are run as one batch of up to `max_batch_size` images, the
first waiting at most `batch_timeout_ms` for company. A full queue sheds
load at once (503 + Retry-After) rather than letting latency pile up."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from contextvars import ContextVar

import numpy as np

from serve.deadline import Expired


# The ids of the requests whose images the model call running now holds, for
# a backend that passes them on (TF Serving's gRPC metadata). The app sets one
# per request on the request's thread; a batch runs on the batcher's thread,
# which no request's context reaches, so the batcher sets every id of the batch there.
request_ids: ContextVar[tuple[str, ...]] = ContextVar("request_ids", default=())


class Overloaded(Exception):
    """The batching queue is full: a 503 with Retry-After."""


class Batcher:
    def __init__(self, run, max_batch_size: int, batch_timeout_ms: float, max_queue: int, on_batch=None):
        """`run(images) -> (outputs, info)` is called on one thread with up to `max_batch_size` images:
        a uint8 array, or a list of encoded images, as the requests sent them."""
        self.run = run
        self.max_batch_size = max_batch_size
        self.timeout = batch_timeout_ms / 1000
        self.on_batch = on_batch or (lambda size: None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        if max_batch_size > 1:
            threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    def predict(self, images: np.ndarray, timeout: float):
        """The outputs for `images`, within `timeout` seconds (Expired past them)."""
        if self.max_batch_size == 1 or len(images) >= self.max_batch_size:
            # Batching off, or a request that fills a batch on its own.
            self.on_batch(len(images))
            return self.run(images)
        future: Future = Future()
        try:
            self._queue.put_nowait((images, future, request_ids.get(), time.monotonic() + timeout))
        except queue.Full:
            raise Overloaded("the server is at capacity; retry shortly") from None
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()  # still queued: the model need not run for a client that has gone
            raise Expired("the deadline passed while the images waited for the model") from None

    def _loop(self) -> None:
        carry = None
        while True:
            batch = [carry or self._queue.get()]
            carry = None
            size = len(batch[0][0])
            deadline = time.monotonic() + self.timeout
            while size < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if size + len(item[0]) > self.max_batch_size:
                    carry = item  # would overflow: it starts the next batch
                    break
                batch.append(item)
                size += len(item[0])
            self._run(batch)

    def _run(self, batch: list) -> None:
        live = [item for item in batch if item[1].set_running_or_notify_cancel()]
        # A request past its deadline has its answer (a 504) already, or at once: the model skips its images.
        now = time.monotonic()
        for _, f, _, until in live:
            if until <= now:
                f.set_exception(Expired("the deadline passed while the images waited for the model"))
        live = [item for item in live if item[3] > now]
        if not live:
            return
        request_ids.set(tuple(i for _, _, ids, _ in live for i in ids))
        try:
            parts = [images for images, _, _, _ in live]
            # Encoded images stay a list: numpy's bytes arrays would drop a file's trailing NULs.
            images = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [x for p in parts for x in p]
            self.on_batch(len(images))
            outputs, info = self.run(images)
        except Exception as exc:  # handed to every waiting request, which maps it to a status;
            # the batcher thread itself must outlive any one batch
            for _, f, _, _ in live:
                f.set_exception(exc)
            return
        start = 0
        for part, f, _, _ in live:
            end = start + len(part)
            # A signature's outputs by name, each sliced alike; or one array.
            f.set_result(({k: v[start:end] for k, v in outputs.items()} if isinstance(outputs, dict)
                          else outputs[start:end], info))
            start = end
