"""The NCCL communicator: gradient sums between GPUs of CuPy arrays, without host copies.

Made from an :class:`~anycnn.dist.mpi.MPICommunicator`, which it uses to start up (rank 0 makes
the NCCL unique id and broadcasts it) and for everything that is not a buffer collective
(barrier, abort, object exchange). Each rank uses GPU ``local_rank`` of its node, so a node
needs as many visible GPUs as ranks.

Buffers are 1-D, contiguous float32/float64 CuPy arrays on this rank's GPU; the collectives
run in place on CuPy's current stream (queued: later work on that stream sees the result).
"""

from __future__ import annotations

from typing import Any, NoReturn

from ..errors import DistributedError, ShapeError
from .comm import Communicator, check_buffer

CUPY_HINT = "pip install 'anycnn[cupy]'  (needs an NVIDIA GPU and the CUDA 12 driver)"


def load_cupy() -> tuple[Any, Any]:
    """``(cupy, cupy.cuda.nccl)``, or a :class:`DistributedError` saying what is missing."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        raise DistributedError(
            f"NCCL cannot be used: cupy is not importable ({type(exc).__name__}: {exc}). "
            f"Fix: {CUPY_HINT}") from exc
    try:
        from cupy.cuda import nccl
    except Exception as exc:
        raise DistributedError(
            f"NCCL cannot be used: this cupy has no NCCL ({type(exc).__name__}: {exc}). "
            "Fix: pip install nvidia-nccl-cu12 (or a cupy wheel built with NCCL)") from exc
    if not getattr(nccl, "available", True):
        raise DistributedError("NCCL cannot be used: cupy.cuda.nccl reports NCCL unavailable. "
                               "Fix: pip install nvidia-nccl-cu12")
    return cupy, nccl


class NCCLCommunicator(Communicator):
    """NCCL collectives for CuPy buffers; everything else goes through ``mpi``.

    Args:
        mpi: the MPI communicator of the same job (same ranks).
        cupy, nccl: the modules to use (default: :func:`load_cupy`); tests pass fakes.

    Raises:
        DistributedError: cupy/NCCL missing, or more ranks on this node than visible GPUs.
    """

    name = "nccl"

    def __init__(self, mpi: Any, *, cupy: Any = None, nccl: Any = None) -> None:
        if cupy is None or nccl is None:
            cupy, nccl = load_cupy()
        self.mpi, self.cupy, self.nccl = mpi, cupy, nccl
        self.rank, self.size = mpi.rank, mpi.size
        self.local_rank, self.local_size = mpi.local_rank, mpi.local_size
        count = int(cupy.cuda.runtime.getDeviceCount())
        if self.local_size > count:
            raise DistributedError(
                f"rank {self.rank}/{self.size}: {self.local_size} ranks on this node but only "
                f"{count} visible GPU(s); NCCL needs one GPU per rank. Start at most {count} "
                "ranks per node (or check CUDA_VISIBLE_DEVICES)")
        self.device_id = self.local_rank
        cupy.cuda.Device(self.device_id).use()
        uid = nccl.get_unique_id() if mpi.is_root else None
        uid = mpi.broadcast_object(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def _check(self, buf: Any) -> Any:
        """NCCL dtype code of a valid buffer on this rank's GPU."""
        if not isinstance(buf, self.cupy.ndarray):
            raise ShapeError(f"the NCCL communicator takes CuPy arrays, got "
                             f"{type(buf).__module__}.{type(buf).__name__}; use the cupy backend "
                             "(ANYCNN_BACKEND=cupy) or the MPI communicator")
        name = check_buffer(buf)
        if int(buf.device.id) != self.device_id:
            raise ShapeError(f"buffer is on GPU {buf.device.id}, but rank {self.rank} uses GPU "
                             f"{self.device_id}")
        return self._dtypes[name]

    @staticmethod
    def _on_host(buf: Any) -> bool:
        import numpy as np

        return isinstance(buf, np.ndarray)

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce_(self, buf: Any) -> Any:
        """Sum a CuPy buffer over NCCL in place; a host (NumPy) buffer, such as the trainer's
        few stop flags and evaluation sums, goes through the MPI communicator."""
        if self._on_host(buf):
            return self.mpi.allreduce_(buf)
        dtype = self._check(buf)
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, dtype, self.nccl.NCCL_SUM, self._stream())
        return buf

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        if self._on_host(buf):
            return self.mpi.broadcast_(buf, root)
        dtype = self._check(buf)
        root = self._check_root(root)
        self.comm.bcast(buf.data.ptr, buf.size, dtype, root, self._stream())
        return buf

    def barrier(self) -> None:
        self.mpi.barrier()

    def abort(self, code: int = 1, message: str | None = None) -> NoReturn:
        self.mpi.abort(code, message)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.mpi.allgather_object(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.mpi.broadcast_object(obj, root)
