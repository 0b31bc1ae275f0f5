"""The exceptions anycnn raises on purpose.

Every error a user can cause derives from :class:`AnycnnError`, so a caller (and the CLI) can tell
"you asked for something wrong" from a bug. Each also derives from the matching built-in type
(``ValueError``, ``RuntimeError``, ...), so ordinary ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class AnycnnError(Exception):
    """Base class of every documented anycnn error."""


class BackendError(AnycnnError, RuntimeError):
    """A backend is unknown, not installed, or cannot reach its device."""


class BackendMismatchError(AnycnnError, TypeError):
    """Arrays from two backends or two devices were mixed in one call."""


class ShapeError(AnycnnError, ValueError):
    """An array has the wrong rank, size, channel count or dtype for the operation."""


class ConfigError(AnycnnError, ValueError):
    """A hyperparameter or a name (model, dataset, optimizer, ...) is invalid."""


class DataError(AnycnnError, ValueError):
    """A dataset file is missing, truncated or malformed, or a download failed."""


class CheckpointError(AnycnnError, ValueError):
    """A checkpoint cannot be read, does not match the model, or cannot be written."""


class TrainingError(AnycnnError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN or infinite)."""
