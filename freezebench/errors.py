"""Errors a user can act on.

Everything freezebench raises on bad input derives from :class:`FreezebenchError`; the command line prints
its message (no traceback unless ``--debug``) and exits non-zero. Messages name the problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FreezebenchError(Exception):
    """Base class of the errors meant for the user (printed without a traceback)."""


class ConfigError(FreezebenchError):
    """A configuration key or value is invalid."""


class UnknownNameError(FreezebenchError, KeyError):
    """A policy, model or dataset name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(FreezebenchError):
    """A dataset's files are missing from the local root."""


class NonFiniteLossError(FreezebenchError):
    """Training produced a NaN or infinite loss."""


class TrackingError(FreezebenchError):
    """The MLflow tracking store cannot be used."""


class CheckpointError(FreezebenchError):
    """A checkpoint cannot be read, does not fit this run, or cannot be written."""


class TrainingInterrupted(FreezebenchError):
    """SIGTERM/SIGINT stopped training at a step boundary after a checkpoint was written."""

    def __init__(self, message: str, signum: int, checkpoint: str | None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = nearest(name, choices)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
