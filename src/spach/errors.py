"""User-facing errors.

Anything a user can cause (a bad path, a bad flag, a wrong checkpoint) raises :class:`SpachError` with one
sentence naming the thing and the fix. The CLI prints it on one line and exits non-zero, without a traceback.
"""


class SpachError(Exception):
    """An error the user can fix; its message names the problem and the fix."""

    exit_code = 2


class DataError(SpachError):
    """The dataset on disk is missing, malformed or unreadable."""


class CheckpointError(SpachError):
    """A checkpoint file cannot be read, is not trusted, or does not fit the model."""
