"""The memory a worker's threads may spend decoding images at once. Each
image takes its pixels' bytes (common.images.decoded_bytes, read from its
header) for as long as it is decoded; an image waits, within its request's
deadline, until the others leave room, so many large images at once cost
their budget, not their number. An image larger than the whole budget is
decoded when nothing else is."""

from __future__ import annotations

import contextlib
import ctypes
import threading

from serve import deadline

# One image at the largest size decoded (common.images.DECODED_PIXELS) converted to RGB, or two
# already RGB: measured in docs/benchmarks.md (Hostile clients).
DECODE_BYTES = 128 * 2**20
# glibc's mallopt parameters (malloc.h).
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8


class Budget:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        """Hold `nbytes` of the budget; wait for them until the request's deadline (deadline.Expired)."""
        deadline.check("decoding an image")
        with self._changed:
            fits = lambda: self.used == 0 or self.used + nbytes <= self.capacity  # noqa: E731
            if not self._changed.wait_for(fits, timeout=deadline.remaining()):
                raise deadline.Expired("the deadline passed while the image waited for decoding memory")
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


# One per worker process, shared by its threads.
DECODING = Budget(DECODE_BYTES)


def return_freed_memory() -> None:
    """Have glibc's malloc give an image's memory back to the system once it is freed. By default it
    raises its mmap threshold to the largest block freed (up to 32 MiB), so after the first large image
    Pillow's 16 MiB blocks come from the heap, and stay there, in one of up to 8 arenas per core. A fixed
    threshold maps every block of 4 MiB or more on its own; two arenas keep the rest together.
    Measured in docs/benchmarks.md (Hostile clients). Elsewhere than glibc, nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 4 * 2**20)
    mallopt(M_ARENA_MAX, 2)
