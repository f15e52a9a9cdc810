"""Errors a user can cause. The CLI prints each as one line and exits non-zero (no traceback)."""


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
