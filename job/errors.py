"""Errors the job reports to its user, each with the exit code the contract gives it.

Anything raised as a JobError ends the process with one readable line and
that code; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class JobError(Exception):
    exit_code = 1


class ConfigError(JobError):
    exit_code = 2


class DataError(JobError):
    exit_code = 3

    @classmethod
    def oversized(cls, name: str, size: int, limit: int, what: str) -> DataError:
        """`name` is (or declares it is) larger than `what` can be: refused before it is read, as
        a few hundred bytes of archive can declare gigabytes (a sparse member, a forged header)."""
        return cls(f"{name} is {size} bytes, more than {what} can be (at most {limit >> 20} MiB); not read")


class StorageError(JobError):
    """Storage could not be read or written. `transient` says whether waiting
    can help (an outage, throttling) or not (a full disk, a read-only mount, a
    denied write): the job retries only the first kind, and exits 4 either
    way, as another attempt of the whole job may land where it can write."""

    exit_code = 4

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient
        self.key: str | None = None

    def named(self, key: str) -> StorageError:
        """This failure as the user sees it: led by the config key that chose the location."""
        if self.key is not None:
            return self
        error = StorageError(f"{key}: {self}", self.transient)
        error.key = key
        return error


class DivergedError(JobError):
    """The loss went NaN or infinite; nothing was checkpointed after it did."""

    exit_code = 5


class Preempted(JobError):
    """SIGTERM arrived and a checkpoint was committed; the job is meant to be retried."""

    exit_code = 75


class PeerLost(JobError):
    """Another worker of a multi-worker run died or never started. The job is
    meant to be retried as a whole; every worker then resumes from the last
    committed checkpoint."""

    exit_code = 75
