"""The MPI communicator, over mpi4py (imported when a :class:`MPICommunicator` is made).

NumPy buffers go straight to MPI's buffer interface (``Allreduce(IN_PLACE, ...)``, ``Bcast``),
which is 15-25x faster than mpi4py's pickling lower-case methods. Other backends pass through
host memory: a CPU torch tensor is reduced in place through its shared NumPy view; cupy,
array-api-strict and GPU torch arrays are copied to the host, reduced, and copied back onto the
input's own backend and device as a new array (PyPI MPI builds are not CUDA-aware; use
``anycnn.dist.nccl`` for GPUs).
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import array_api_compat
import numpy as np

from ..backend import Backend, backend_label, asarray, namespace_of, to_numpy
from ..errors import DistributedError, ShapeError
from .comm import Communicator, check_buffer

INSTALL_HINT = "pip install 'anycnn[mpi]'  (or: pip install mpi4py mpich)"
#: seconds a rank waits between printing why it aborts and aborting: MPI_Abort tears the job
#: down at once, and output still on its way through the launcher would be lost
ABORT_GRACE_S = 0.25


def load_mpi() -> Any:
    """``mpi4py.MPI``, or a :class:`DistributedError` with the install hint."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(
            f"MPI cannot be used: mpi4py is not installed ({exc}). Fix: {INSTALL_HINT}"
        ) from exc
    except RuntimeError as exc:  # mpi4py present, MPI library missing or broken
        raise DistributedError(
            f"MPI cannot be used: mpi4py could not load an MPI library ({exc}). "
            f"Fix: {INSTALL_HINT}"
        ) from exc
    return MPI


def _backend_of(x: Any) -> Backend:
    """The backend (library, namespace, device) an array lives on, to copy results back."""
    return Backend(name=backend_label(x), xp=namespace_of(x),
                   device=array_api_compat.device(x), reason="the input array's own backend")


class MPICommunicator(Communicator):
    """A communicator over an MPI communicator (default ``MPI.COMM_WORLD``).

    ``local_rank``/``local_size`` come from the node-local communicator
    (``Split_type(COMM_TYPE_SHARED)``).
    """

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        self.MPI = load_mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            self.local_rank = int(node.Get_rank())
            self.local_size = int(node.Get_size())
        finally:
            node.Free()

    def _host_buffer(self, buf: Any) -> tuple[np.ndarray, bool]:
        """(host array MPI may write, whether writing it writes ``buf`` itself)."""
        if type(buf) is np.ndarray:
            if not buf.flags.writeable:
                raise ShapeError("buffer is read-only; pass a writeable array")
            return buf, True
        if array_api_compat.is_torch_array(buf) and buf.device.type == "cpu":
            return buf.detach().numpy(), True  # shares the tensor's memory
        return np.array(to_numpy(buf), copy=True, order="C"), False

    def _collective(self, buf: Any, run: Any) -> Any:
        check_buffer(buf)
        host, shared = self._host_buffer(buf)
        run(host)
        if shared:
            return buf
        return asarray(host, backend=_backend_of(buf))

    def allreduce_(self, buf: Any) -> Any:
        return self._collective(
            buf, lambda host: self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM))

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        root = self._check_root(root)
        return self._collective(buf, lambda host: self.comm.Bcast(host, root=root))

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1, message: str | None = None) -> NoReturn:
        self._abort_message(code, message)
        time.sleep(ABORT_GRACE_S)  # let the launcher forward this rank's last output
        self.MPI.COMM_WORLD.Abort(code)
        raise SystemExit(code)  # pragma: no cover - Abort does not return

    def allgather_object(self, obj: Any) -> list[Any]:
        return list(self.comm.allgather(obj))

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=self._check_root(root))
