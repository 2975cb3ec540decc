"""Errors the job reports to its user, each with the exit code the contract gives it.

Anything raised as a JobError ends the process with one readable line and
that code; everything else is a bug and keeps its traceback.
"""


class JobError(Exception):
    exit_code = 1


class ConfigError(JobError):
    exit_code = 2


class DataError(JobError):
    exit_code = 3


class StorageError(JobError):
    exit_code = 4


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
