"""Errors fastft reports to the user as one line (no traceback)."""


class FastftError(Exception):
    """Base class: the CLI prints `fastft: error: <message>` and exits non-zero."""


class ConfigError(FastftError):
    """A config key, type or value is wrong."""


class DataError(FastftError):
    """The data folder, file list or a file in it is unusable."""


class ModelError(FastftError):
    """The model name, weights or head cannot be built."""


class CheckpointError(FastftError):
    """A checkpoint cannot be read or does not match."""
