"""The exceptions anycnn raises on purpose.

Every error a user can cause derives from :class:`AnycnnError`, so a caller (and the CLI) can tell
"you asked for something wrong" from a bug. Each also derives from the matching built-in type
(``ValueError``, ``RuntimeError``, ...), so ordinary ``except ValueError`` code keeps working.
The CLI prints any of them as one line ``anycnn: error: ...`` and exits with status 2.

What raises which (each case is tested, mostly in ``tests/test_reliability.py``):

================== ===========================================================================
``ShapeError``     a layer or loss input of the wrong rank, channel count or dtype (integer,
                   complex or bool where floats are needed; float inputs whose dtype differs
                   from the layer's parameters), a spatial size too small for the kernel,
                   something that is not an array at all, labels of the wrong shape, dtype or
                   range, an empty batch or a batch-size mismatch between inputs and labels,
                   a gradient whose shape differs from its parameter's; a Dense after a
                   Flatten that gets the wrong feature count also names the input image size
                   the model expects
``BackendMismatchError`` arrays of two backends or two devices in one call (both are named)
``ConfigError``    invalid hyperparameters (kernel/stride/dilation < 1, negative or too large
                   padding, dropout ``p`` outside [0, 1), non-positive or non-finite learning
                   rate, ...), unknown model/dataset/optimizer/schedule names (the valid
                   ones are listed), invalid command-line options
``BackendError``   ``ANYCNN_BACKEND`` (or ``--backend``) unknown, not installed or unusable
``DataError``      dataset files missing, unreadable, truncated, with a wrong magic number or
                   header, gzip-corrupt, image/label count mismatch; a download that failed or
                   whose SHA-256 differs from the pinned digest (the file is deleted); an
                   ``ArrayDataset`` of images neither ``uint8`` nor float in [0, 1] (the range
                   found is named), or that look channels first (the transpose to NHWC is given)
``CheckpointError`` a checkpoint missing, truncated, not safetensors, not anycnn, from a newer
                   format version or from another model (first mismatching tensor and both
                   shapes); a save that cannot be written (path and OS reason) or that would
                   contain NaN/inf weights
``TrainingError``  the loss became NaN or infinite (epoch, step and last good checkpoint named)
``DistributedError`` ``ANYCNN_DIST`` unknown, mpi4py/mpiexec/cupy NCCL missing, more ranks on a
                   node than GPUs, a collective's root out of range
================== ===========================================================================
"""

from __future__ import annotations


class AnycnnError(Exception):
    """Base class of every documented anycnn error."""


class BackendError(AnycnnError, RuntimeError):
    """A backend is unknown, not installed, or cannot reach its device."""


class BackendMismatchError(AnycnnError, TypeError):
    """Arrays from two backends or two devices were mixed in one call."""


class ShapeError(AnycnnError, ValueError):
    """An input is not an array, or has the wrong rank, size, channel count or dtype."""


class ConfigError(AnycnnError, ValueError):
    """A hyperparameter or a name (model, dataset, optimizer, ...) is invalid."""


class DataError(AnycnnError, ValueError):
    """A dataset file is missing, truncated or malformed, or a download failed."""


class CheckpointError(AnycnnError, ValueError):
    """A checkpoint cannot be read, does not match the model, or cannot be written."""


class TrainingError(AnycnnError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN or infinite)."""


class DistributedError(AnycnnError, RuntimeError):
    """A multi-process job cannot be set up (launcher, MPI, NCCL or GPU count)."""
