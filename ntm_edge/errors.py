"""Errors a user can cause. The CLI prints each as one line and exits non-zero (no traceback)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class NtmError(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug."""

    quiet = False  # True: another process reports it (a torchrun rank other than 0), so do not print it


class ConfigError(NtmError):
    """An unknown preset, a bad option value, or a config that does not describe a model."""


class DataError(NtmError):
    """A dataset that cannot be found, read or used."""


class PromptError(NtmError):
    """A prompt that the model's prompt encoder does not know."""


class CheckpointError(NtmError):
    """A checkpoint directory that is missing, incomplete, corrupt or from another model."""


def one_line(e: NtmError) -> str:
    """The line a command prints for ``e``: "error: ...", with any newline in it (a path may hold one) escaped."""
    return f"error: {e}".replace("\r", "\\r").replace("\n", "\\n")


def exit_status(work: Callable[[], object]) -> int:
    """Run a script's work -> 0, or 1 after printing its NtmError as one line on stderr (``python -m`` mains)."""
    try:
        work()
    except NtmError as e:
        print(one_line(e), file=sys.stderr)
        return 1
    return 0
