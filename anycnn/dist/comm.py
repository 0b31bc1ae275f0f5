"""The communicator interface every data-parallel piece of anycnn talks to.

A communicator joins the ``size`` processes (ranks) of one job. Training needs very little
from it: one sum over ranks of a flat gradient buffer per step (:meth:`Communicator.allreduce_`),
a broadcast of the initial weights (:meth:`Communicator.broadcast_`), and, at start-up only,
small pickled Python objects to check that every rank agrees (:meth:`allgather_object`,
:meth:`broadcast_object`).

Buffers are 1-D, C-contiguous ``float32`` or ``float64`` arrays of any backend. The methods
ending in ``_`` work in place where the array library allows it and *return the result*:
always use the returned array (for an immutable array library it is a new array).

:class:`SingleProcess` is the one-rank communicator (no MPI at all); ``anycnn.dist.mpi`` and
``anycnn.dist.nccl`` hold the multi-process ones.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import array_api_compat
import numpy as np

from ..backend import dtype_name
from ..errors import DistributedError, ShapeError

#: the dtypes a communicator buffer may have
BUFFER_DTYPES = ("float32", "float64")


def check_buffer(buf: Any, what: str = "buffer") -> str:
    """Refuse anything but a 1-D, contiguous float32/float64 array; return its dtype name.

    Raises:
        ShapeError: ``buf`` is not an array, not 1-D, not contiguous, or of another dtype.
    """
    if not array_api_compat.is_array_api_obj(buf) or isinstance(buf, np.generic):
        raise ShapeError(f"{what} must be a 1-D float32/float64 array, got {type(buf).__name__}")
    if buf.ndim != 1:
        raise ShapeError(f"{what} must be 1-D (one flat buffer), got shape {tuple(buf.shape)}; "
                         "flatten it first")
    try:
        name = dtype_name(buf)
    except TypeError:
        name = str(buf.dtype)
    if name not in BUFFER_DTYPES:
        raise ShapeError(f"{what} must be float32 or float64, got {name}")
    if not _contiguous(buf):
        raise ShapeError(f"{what} must be contiguous (a strided view was given); "
                         "pass a contiguous copy")
    return name


def _contiguous(buf: Any) -> bool:
    """Whether a 1-D array is contiguous (libraries without the notion count as contiguous)."""
    if array_api_compat.is_torch_array(buf):
        return bool(buf.is_contiguous())
    flags = getattr(buf, "flags", None)  # numpy, cupy
    if flags is not None and hasattr(flags, "c_contiguous"):
        return bool(flags.c_contiguous)
    return True


class Communicator:
    """One small interface over the processes of a job.

    Attributes:
        name: ``"single"``, ``"mpi"`` or ``"nccl"``.
        rank: this process's index in ``range(size)``.
        size: number of processes in the job.
        local_rank: index among the processes on this node (selects the GPU, the CPU slice).
        local_size: number of processes on this node.
    """

    name: str = "base"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_root(self) -> bool:
        """True on rank 0, the one rank that prints and writes files."""
        return self.rank == 0

    def allreduce_(self, buf: Any) -> Any:
        """Sum of ``buf`` (1-D float32/float64, shape ``(n,)``) over all ranks.

        In place where the array library allows it; the returned array is the result (use it).
        Every rank gets bit-identical values.
        """
        raise NotImplementedError

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        """``buf`` of rank ``root`` on every rank (same buffer rules as :meth:`allreduce_`)."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank has reached this call."""
        raise NotImplementedError

    def abort(self, code: int = 1, message: str | None = None) -> NoReturn:
        """End the whole job with exit status ``code`` (every rank, not only this one).

        Prints ``anycnn: rank R/N: message`` to stderr once first.
        """
        raise NotImplementedError

    def allgather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; start-up checks only)."""
        raise NotImplementedError

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """``obj`` of rank ``root`` on every rank (pickled; start-up checks only)."""
        raise NotImplementedError

    def _check_root(self, root: int) -> int:
        if not isinstance(root, int) or isinstance(root, bool) or not 0 <= root < self.size:
            raise DistributedError(f"root must be a rank in 0..{self.size - 1}, got {root!r}")
        return root

    def _abort_message(self, code: int, message: str | None) -> None:
        """Print the abort line once per process (two threads may fail at the same time)."""
        if getattr(self, "_aborting", False):
            return
        self._aborting = True
        text = message if message is not None else f"aborting the job (exit code {code})"
        print(f"anycnn: rank {self.rank}/{self.size}: {text}", file=sys.stderr, flush=True)
        sys.stdout.flush()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, local_size={self.local_size})")


class SingleProcess(Communicator):
    """The communicator of a job of one process: every collective is the identity."""

    name = "single"

    def allreduce_(self, buf: Any) -> Any:
        check_buffer(buf)
        return buf

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        check_buffer(buf)
        self._check_root(root)
        return buf

    def barrier(self) -> None:
        return None

    def abort(self, code: int = 1, message: str | None = None) -> NoReturn:
        self._abort_message(code, message)
        sys.exit(code)

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        self._check_root(root)
        return obj
