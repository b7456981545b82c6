"""The one exception family that reaches the user as a message instead of a traceback."""

from __future__ import annotations


class SeqtrainError(Exception):
    """A user mistake or a bad input: the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class ConfigError(SeqtrainError):
    """A config file or override that does not fit the schema (exit code 2, like a usage error)."""

    exit_code = 2


class DataError(SeqtrainError):
    """A dataset, split, column or row that cannot be used as asked."""


class CheckpointError(SeqtrainError):
    """A run directory or checkpoint that is missing, corrupt or unsafe to load."""


class DiskFullError(CheckpointError):
    """A checkpoint that could not be written because the disk or the quota is full: the machine's
    fault, not the run's, so `seqtrain tune` stops the study (resumable) instead of failing trial after
    trial."""
