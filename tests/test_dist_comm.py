"""anycnn.dist: communicators, launcher detection, abort hook, core binding, mpiexec command.

Unit tests run everywhere (the NCCL communicator with fake cupy/nccl modules). The real MPI tests
start ``mpiexec`` subprocesses of tests/dist_scripts/mpi_worker.py under timeouts (a hang is a
failure) and are skipped when mpi4py or mpiexec is missing; pytest itself never runs under
mpiexec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from anycnn.dist import launch
from anycnn.dist.comm import Communicator, SingleProcess, check_buffer
from anycnn.errors import AnycnnError, ConfigError, DistributedError, ShapeError
from anycnn.kernels import threads as kthreads

from .mpi_run import LAUNCHER_PREFIXES, SCRIPTS, child_env, mpiexec_or_skip

WORKER = SCRIPTS / "mpi_worker.py"


@pytest.fixture(autouse=True)
def _fresh_communicator():
    launch.reset_communicator()
    yield
    launch.reset_communicator()


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables, no ANYCNN_DIST / thread / binding settings."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES) or name in (
                "ANYCNN_DIST", "ANYCNN_NUM_THREADS", "ANYCNN_BIND_CORES"):
            monkeypatch.delenv(name)
    return monkeypatch


# ---------------------------------------------------------------- SingleProcess and buffers


def test_single_process_is_rank_zero_of_one():
    comm = SingleProcess()
    assert (comm.name, comm.rank, comm.size, comm.local_rank, comm.local_size) == (
        "single", 0, 1, 0, 1)
    assert comm.is_root
    buf = np.arange(5, dtype=np.float32)
    assert comm.allreduce_(buf) is buf
    assert comm.broadcast_(buf) is buf
    comm.barrier()
    assert comm.allgather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object("x") == "x"


def test_single_process_abort_prints_once_and_exits(capsys):
    comm = SingleProcess()
    with pytest.raises(SystemExit) as info:
        comm.abort(3, "disk full")
    assert info.value.code == 3
    assert capsys.readouterr().err == "anycnn: rank 0/1: disk full\n"
    with pytest.raises(SystemExit):
        comm.abort(3, "again")
    assert capsys.readouterr().err == ""


def test_single_process_broadcast_root_out_of_range():
    with pytest.raises(DistributedError, match=r"root must be a rank in 0\.\.0, got 1"):
        SingleProcess().broadcast_(np.zeros(2), root=1)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3)), r"must be 1-D .* shape \(2, 3\)"),
    (np.zeros(4, dtype=np.int32), "float32 or float64, got int32"),
    (np.zeros(4, dtype=np.float16), "float32 or float64, got float16"),
    (np.zeros(8)[::2], "must be contiguous"),
    ([1.0, 2.0], "got list"),
    (np.float64(1.0), "got float64"),
])
def test_buffers_are_checked(bad, message):
    with pytest.raises(ShapeError, match=message):
        check_buffer(bad)
    with pytest.raises(ShapeError, match=message):
        SingleProcess().allreduce_(bad)


def test_check_buffer_torch_and_strict():
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    assert check_buffer(torch.zeros(3)) == "float32"
    assert check_buffer(xps.zeros(3, dtype=xps.float64)) == "float64"
    with pytest.raises(ShapeError, match="contiguous"):
        check_buffer(torch.zeros(6)[::2])


def test_distributed_error_is_an_anycnn_error():
    assert issubclass(DistributedError, AnycnnError)
    assert issubclass(DistributedError, RuntimeError)


# ---------------------------------------------------------------- launcher detection


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "pmi"),
    ({"PMI_RANK": "0"}, None),  # half a PMI environment is not a launch
    ({"PMIX_RANK": "1"}, "pmix"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "PMIX_RANK": "1"}, "openmpi"),
    ({"MV2_COMM_WORLD_SIZE": "2"}, "mvapich"),
    # an sbatch script: SLURM_PROCID and the allocation's SLURM_NTASKS, but no step
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}, None),
    # the batch step's own id is not an srun step
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "4294967294"}, None),
    ({"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}, "slurm"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "2", "SLURM_NTASKS": "4"}, "slurm"),
    # a one-task srun step is one process, even inside a larger allocation
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"}, None),
    ({"SLURM_STEPID": "1", "SLURM_STEP_NUM_TASKS": "2"}, "slurm"),
    ({"SLURM_STEP_ID": "x", "SLURM_STEP_NUM_TASKS": "2"}, None),
])
def test_launcher_env(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert launch.launcher_env() == expected


# ---------------------------------------------------------------- get_communicator


def test_auto_without_launcher_is_single_and_cached(clean_env):
    comm = launch.get_communicator()
    assert isinstance(comm, SingleProcess)
    assert launch.get_communicator() is comm
    assert launch.get_communicator("auto") is comm
    assert launch.get_communicator("single") is comm


def test_env_var_chooses(clean_env):
    clean_env.setenv("ANYCNN_DIST", "Single")
    assert launch.get_communicator().name == "single"


@pytest.mark.parametrize("kind", ["mpich", "gloo", ""])
def test_unknown_kind_lists_valid_names(clean_env, kind):
    with pytest.raises(DistributedError, match="valid names: auto, single, mpi, nccl"):
        launch.get_communicator(kind)


def test_unknown_env_value_names_the_variable(clean_env):
    clean_env.setenv("ANYCNN_DIST", "horovod")
    with pytest.raises(DistributedError, match=r"'horovod' \(ANYCNN_DIST\)"):
        launch.get_communicator()


def test_mpi_without_mpi4py_gives_install_hint(clean_env):
    clean_env.setitem(sys.modules, "mpi4py", None)  # makes "from mpi4py import MPI" fail
    with pytest.raises(DistributedError, match=r"mpi4py is not installed.*anycnn\[mpi\]"):
        launch.get_communicator("mpi")


def test_auto_under_a_launcher_takes_mpi(clean_env):
    made = []

    class FakeMPI(Communicator):
        name = "mpi"

        def __init__(self):
            made.append(self)

    clean_env.setattr("anycnn.dist.mpi.MPICommunicator", FakeMPI)
    clean_env.setenv("PMI_RANK", "0")
    clean_env.setenv("PMI_SIZE", "2")
    comm = launch.get_communicator()
    assert made == [comm]
    with pytest.raises(DistributedError, match="already 'mpi'; cannot switch to 'single'"):
        launch.get_communicator("single")


def test_nccl_needs_the_cupy_backend(clean_env):
    class FakeMPI(Communicator):
        name = "mpi"

    clean_env.setattr("anycnn.dist.mpi.MPICommunicator", FakeMPI)
    import anycnn

    with anycnn.use_backend("numpy"), pytest.raises(
            DistributedError, match="needs the cupy backend, but the backend is 'numpy'"):
        launch.get_communicator("nccl")


def test_importing_dist_imports_no_mpi4py(clean_env):
    code = ("import sys, anycnn.dist as d; c = d.get_communicator(); "
            "import anycnn.dist.mpi, anycnn.dist.nccl; "
            "print(c.name, 'mpi4py' in sys.modules, 'cupy' in sys.modules)")
    env = child_env()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert out.stdout.split() == ["single", "False", "False"]


def test_lazy_exports():
    import anycnn.dist as dist

    assert dist.SingleProcess is SingleProcess
    assert "workers_command" in dir(dist)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dist.nope  # noqa: B018


# ---------------------------------------------------------------- NCCL with fakes


class FakeNcclComm:
    def __init__(self, size, uid, rank):
        self.init = (size, uid, rank)
        self.calls = []

    def allReduce(self, send, recv, count, dtype, op, stream):  # cupy's spelling
        self.calls.append(("allReduce", send, recv, count, dtype, op, stream))

    def bcast(self, buf, count, dtype, root, stream):
        self.calls.append(("bcast", buf, count, dtype, root, stream))


class FakeArray:
    """Just what NCCLCommunicator reads of a cupy.ndarray."""

    __array_namespace__ = None  # replaced below: check_buffer asks for an Array API object

    def __init__(self, n, dtype, device=0, ptr=0xABC000, ndim=1, contiguous=True):
        self.size, self.ndim, self.shape = n, ndim, (n,) * ndim
        self.dtype = np.dtype(dtype)
        self.device = SimpleNamespace(id=device)
        self.data = SimpleNamespace(ptr=ptr)
        self.flags = SimpleNamespace(c_contiguous=contiguous)


def _fake_modules(gpus=4, log=None):
    log = log if log is not None else []

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            log.append(("use", self.index))

    cuda = SimpleNamespace(
        runtime=SimpleNamespace(getDeviceCount=lambda: gpus),
        Device=Device,
        get_current_stream=lambda: SimpleNamespace(ptr=0x5157),
    )
    cupy = SimpleNamespace(cuda=cuda, ndarray=FakeArray)
    nccl = SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0,
                           get_unique_id=lambda: (log.append("uid"), b"unique-id")[1],
                           NcclCommunicator=FakeNcclComm)
    return cupy, nccl, log


class FakeMPIComm(Communicator):
    name = "mpi"

    def __init__(self, rank=0, size=2, local_rank=None, local_size=None):
        self.rank, self.size = rank, size
        self.local_rank = rank if local_rank is None else local_rank
        self.local_size = size if local_size is None else local_size
        self.log = []

    def broadcast_object(self, obj, root=0):
        self.log.append(("broadcast_object", obj, root))
        return obj if obj is not None else b"unique-id"  # what rank 0 sent

    def allgather_object(self, obj):
        self.log.append(("allgather_object", obj))
        return [obj]

    def barrier(self):
        self.log.append("barrier")

    def abort(self, code=1, message=None):
        self.log.append(("abort", code, message))


@pytest.fixture
def fake_dtype_names(monkeypatch):
    """Let check_buffer accept FakeArray (an Array API object with a NumPy dtype)."""
    import array_api_compat

    from anycnn.dist import comm as comm_module

    monkeypatch.setattr(comm_module.array_api_compat, "is_array_api_obj",
                        lambda x: isinstance(x, FakeArray)
                        or array_api_compat.is_array_api_obj(x))
    monkeypatch.setattr(comm_module, "dtype_name", lambda x: x.dtype.name)


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_start_up_shares_the_unique_id_and_selects_the_gpu(rank):
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, log = _fake_modules(gpus=2)
    mpi = FakeMPIComm(rank=rank, size=2)
    comm = NCCLCommunicator(mpi, cupy=cupy, nccl=nccl)
    assert ("use", rank) in log
    assert ("uid" in log) == (rank == 0)  # only rank 0 makes the id
    sent = b"unique-id" if rank == 0 else None
    assert mpi.log == [("broadcast_object", sent, 0)]
    assert comm.comm.init == (2, b"unique-id", rank)
    assert (comm.name, comm.rank, comm.size, comm.local_rank) == ("nccl", rank, 2, rank)


def test_nccl_two_nodes_use_local_rank_for_the_gpu():
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, log = _fake_modules(gpus=2)
    comm = NCCLCommunicator(FakeMPIComm(rank=3, size=4, local_rank=1, local_size=2),
                            cupy=cupy, nccl=nccl)
    assert log == [("use", 1)]
    assert comm.comm.init == (4, b"unique-id", 3)


def test_nccl_refuses_more_ranks_than_gpus():
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, log = _fake_modules(gpus=2)
    with pytest.raises(DistributedError, match="3 ranks on this node but only 2 visible GPU"):
        NCCLCommunicator(FakeMPIComm(rank=2, size=3), cupy=cupy, nccl=nccl)
    assert log == []  # no device selected, no NCCL started


@pytest.mark.usefixtures("fake_dtype_names")
@pytest.mark.parametrize("dtype, code", [("float32", 7), ("float64", 8)])
def test_nccl_allreduce_and_broadcast_plumbing(dtype, code):
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, _ = _fake_modules(gpus=2)
    comm = NCCLCommunicator(FakeMPIComm(rank=1, size=2), cupy=cupy, nccl=nccl)
    buf = FakeArray(1000, dtype, device=1, ptr=0xBEEF00)
    assert comm.allreduce_(buf) is buf
    assert comm.broadcast_(buf, root=0) is buf
    assert comm.comm.calls == [
        ("allReduce", 0xBEEF00, 0xBEEF00, 1000, code, 0, 0x5157),
        ("bcast", 0xBEEF00, 1000, code, 0, 0x5157),
    ]


@pytest.mark.usefixtures("fake_dtype_names")
def test_nccl_refuses_wrong_buffers():
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, _ = _fake_modules(gpus=2)
    comm = NCCLCommunicator(FakeMPIComm(rank=1, size=2), cupy=cupy, nccl=nccl)
    with pytest.raises(ShapeError, match=r"takes CuPy arrays, got builtins\.list"):
        comm.allreduce_([0.0, 1.0])
    with pytest.raises(ShapeError, match="on GPU 0, but rank 1 uses GPU 1"):
        comm.allreduce_(FakeArray(3, "float32", device=0))
    with pytest.raises(ShapeError, match="float32 or float64, got int64"):
        comm.allreduce_(FakeArray(3, "int64", device=1))
    with pytest.raises(ShapeError, match="contiguous"):
        comm.allreduce_(FakeArray(3, "float32", device=1, contiguous=False))
    with pytest.raises(DistributedError, match="root must be a rank"):
        comm.broadcast_(FakeArray(3, "float32", device=1), root=2)
    assert comm.comm.calls == []


def test_nccl_delegates_the_rest_to_mpi():
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, _ = _fake_modules(gpus=2)
    mpi = FakeMPIComm(rank=0, size=2)
    comm = NCCLCommunicator(mpi, cupy=cupy, nccl=nccl)
    mpi.log.clear()
    comm.barrier()
    assert comm.allgather_object(5) == [5]
    comm.abort(4, "why")
    assert mpi.log == ["barrier", ("allgather_object", 5), ("abort", 4, "why")]


def test_nccl_without_cupy_says_so(monkeypatch):
    from anycnn.dist.nccl import NCCLCommunicator

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(DistributedError, match="cupy is not importable"):
        NCCLCommunicator(FakeMPIComm())


# ---------------------------------------------------------------- abort hook


@pytest.fixture
def saved_hooks(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)


@pytest.mark.usefixtures("saved_hooks")
def test_abort_hook_not_installed_for_one_rank():
    before = sys.excepthook
    assert launch.install_abort_hook(SingleProcess()) is False
    assert sys.excepthook is before


@pytest.mark.usefixtures("saved_hooks")
def test_abort_hook_prints_traceback_and_aborts(capsys):
    comm = FakeMPIComm(rank=1, size=3)
    assert launch.install_abort_hook(comm) is True
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    # the one-line reason first: the launcher may drop a dying rank's last output
    assert err.startswith("anycnn: rank 1/3 failed: ValueError: bad value\n")
    assert "Traceback (most recent call last)" in err
    assert comm.log == [("abort", 1, None)]


@pytest.mark.usefixtures("saved_hooks")
@pytest.mark.parametrize("rank", [0, 1])
def test_abort_hook_lets_every_rank_errors_end_normally(capsys, rank):
    comm = FakeMPIComm(rank=rank, size=2)
    launch.install_abort_hook(comm)
    exc = ConfigError("ranks differ")
    exc.every_rank = True  # raised by all ranks at the same point: no abort, rank 0 reports
    sys.excepthook(ConfigError, exc, None)
    expected = "anycnn: rank 0/2 failed: ConfigError: ranks differ\n" if rank == 0 else ""
    assert capsys.readouterr().err == expected
    assert comm.log == []


@pytest.mark.usefixtures("saved_hooks")
def test_abort_hook_anycnn_errors_without_traceback(capsys):
    comm = FakeMPIComm(rank=0, size=2)
    launch.install_abort_hook(comm)
    exc = ConfigError("learning rate must be positive")
    sys.excepthook(ConfigError, exc, None)
    assert capsys.readouterr().err == (
        "anycnn: rank 0/2 failed: ConfigError: learning rate must be positive\n")
    assert comm.log == [("abort", 1, None)]


@pytest.mark.usefixtures("saved_hooks")
def test_abort_hook_covers_threads(capsys):
    comm = FakeMPIComm(rank=1, size=2)
    launch.install_abort_hook(comm)

    def work():
        raise RuntimeError("in a thread")

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "anycnn: rank 1/2 failed: RuntimeError: in a thread" in capsys.readouterr().err
    assert comm.log == [("abort", 1, None)]


# ---------------------------------------------------------------- bind_to_cores


class NodeComm(FakeMPIComm):
    """A rank of a job whose other ranks report the given affinities (same host)."""

    def __init__(self, local_rank, local_size, others=None, host=None):
        super().__init__(rank=local_rank, size=local_size, local_rank=local_rank,
                         local_size=local_size)
        self.others, self.host = others, host

    def allgather_object(self, obj):
        host, _, cpus = obj
        return [(self.host or host, r, cpus if self.others is None else self.others[r])
                for r in range(self.size)]


@pytest.fixture
def fake_affinity(clean_env):
    state = {"cpus": set(range(8))}
    clean_env.setattr(os, "sched_getaffinity", lambda pid: set(state["cpus"]))

    def setaffinity(pid, cpus):
        state["cpus"] = set(cpus)

    clean_env.setattr(os, "sched_setaffinity", setaffinity)
    kthreads._usable_cpus.cache_clear()
    yield state
    kthreads._usable_cpus.cache_clear()


@pytest.mark.parametrize("local_rank, expected", [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])])
def test_bind_splits_the_cpus_between_local_ranks(fake_affinity, local_rank, expected):
    assert kthreads.num_threads() == 8
    assert launch.bind_to_cores(NodeComm(local_rank, 2)) == expected
    assert sorted(fake_affinity["cpus"]) == expected
    assert kthreads.num_threads() == 4


def test_bind_more_ranks_than_cpus_gives_one_each(fake_affinity):
    chosen = []
    for r in range(3):  # three processes, each starting with the CPUs {0, 1}
        fake_affinity["cpus"] = {0, 1}
        chosen.append(launch.bind_to_cores(NodeComm(r, 3)))
    assert chosen == [[0], [0], [1]]


def test_bind_keeps_anycnn_num_threads(fake_affinity, clean_env):
    clean_env.setenv("ANYCNN_NUM_THREADS", "3")
    assert launch.bind_to_cores(NodeComm(1, 2)) == [4, 5, 6, 7]
    assert kthreads.num_threads() == 3


@pytest.mark.usefixtures("fake_affinity")
def test_bind_leaves_ranks_bound_by_the_launcher_alone():
    comm = NodeComm(0, 2, others=[list(range(8)), [4, 5, 6, 7]])
    assert launch.bind_to_cores(comm) is None


@pytest.mark.usefixtures("fake_affinity")
def test_bind_nothing_for_one_rank_or_when_turned_off(clean_env):
    assert launch.bind_to_cores(SingleProcess()) is None
    assert launch.bind_to_cores(NodeComm(0, 1)) is None
    clean_env.setenv("ANYCNN_BIND_CORES", "0")
    assert launch.bind_to_cores(NodeComm(0, 2)) is None


@pytest.mark.usefixtures("fake_affinity")
def test_bind_alone_on_its_node():
    comm = NodeComm(0, 2)
    comm.allgather_object = lambda obj: [obj, ("other-host", 0, obj[2])]
    comm.local_size = 1
    assert launch.bind_to_cores(comm) is None


# ---------------------------------------------------------------- mpiexec and its command


def _fake_mpiexec(folder: Path) -> Path:
    path = folder / "mpiexec"
    path.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    path.chmod(0o755)
    return path


def test_find_mpiexec_prefers_the_one_beside_python(tmp_path, clean_env):
    mpiexec = _fake_mpiexec(tmp_path)
    clean_env.setattr(sys, "executable", str(tmp_path / "python"))
    assert launch.find_mpiexec() == str(mpiexec)


def test_find_mpiexec_on_path(tmp_path, clean_env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mpiexec = _fake_mpiexec(bin_dir)
    clean_env.setattr(sys, "executable", str(tmp_path / "python"))
    clean_env.setenv("PATH", str(bin_dir))
    assert launch.find_mpiexec() == str(mpiexec)


def test_find_mpiexec_missing_gives_install_hint(tmp_path, clean_env):
    clean_env.setattr(sys, "executable", str(tmp_path / "python"))
    clean_env.setenv("PATH", str(tmp_path))
    with pytest.raises(DistributedError, match=r"no mpiexec found.*anycnn\[mpi\]"):
        launch.find_mpiexec()


def test_workers_command_shape(tmp_path, fake_affinity, clean_env):
    mpiexec = _fake_mpiexec(tmp_path)  # found beside the fake sys.executable; CPUs are 0..7
    clean_env.setattr(sys, "executable", str(tmp_path / "python"))
    launch._mpiexec_flavour.cache_clear()
    try:
        cmd = launch.workers_command(2, ["train", "--epochs", 3])
    finally:
        launch._mpiexec_flavour.cache_clear()
    assert cmd == [str(mpiexec), "-n", "2", "-bind-to", "user:0+1+2+3,4+5+6+7", sys.executable,
                   "-m", "anycnn", "train", "--epochs", "3"]


@pytest.mark.parametrize("flavour, n, expected", [
    ("hydra", 3, ["-bind-to", "user:0+1,2+3+4,5+6+7"]),
    ("hydra", 10, ["-bind-to", "user:" + ",".join(["0", "0", "1", "2", "3", "4", "4", "5",
                                                    "6", "7"])]),
    ("openmpi", 2, ["--bind-to", "none"]),
    ("unknown", 2, []),
])
def test_bind_flags(fake_affinity, flavour, n, expected):
    assert launch._bind_flags(flavour, n) == expected


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_workers_command_rejects_bad_counts(n):
    with pytest.raises(DistributedError, match="positive integer"):
        launch.workers_command(n, [])


# ---------------------------------------------------------------- real MPI (mpiexec children)


def _run(n: int, mode: str, folder: Path, timeout: float = 60
         ) -> tuple[subprocess.CompletedProcess, float, list[dict]]:
    """Run the worker on ``n`` ranks: (process, seconds, the ranks' JSON lines by rank).

    The ranks write their lines to files in ``folder``: lines of two ranks printed to the
    shared stdout can interleave."""
    cmd = [mpiexec_or_skip(), "-n", str(n), sys.executable, str(WORKER), mode, str(folder)]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(),
                         timeout=timeout, check=False)
    seconds = time.monotonic() - start
    rows = [json.loads(line) for path in sorted(folder.glob("rank-*.json"))
            for line in path.read_text().splitlines()]
    return out, seconds, sorted(rows, key=lambda row: row["rank"])


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_collectives(n, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("array_api_strict")
    out, _, rows = _run(n, "collectives", tmp_path)
    assert out.returncode == 0, out.stderr
    assert [row["rank"] for row in rows] == list(range(n))
    total = n * (n + 1) / 2
    for row in rows:
        assert row["size"] == n and row["name"] == "mpi"
        assert row["local_size"] == n and row["local_rank"] == row["rank"]  # one node here
        for dtype in ("float32", "float64"):
            assert row[f"numpy_{dtype}_inplace"] and row[f"numpy_{dtype}_close"]
        assert row["small_ints_exact"]
        assert [m.split(" (")[0].split(";")[0] for m in row["refused"]] == [
            "buffer must be 1-D", "buffer must be contiguous",
            "buffer must be float32 or float64, got int64",
            "buffer is read-only"]
        assert row["torch_type"] == "torch.Tensor" and row["torch_inplace"]
        assert row["torch_values"] == [total] * 5
        assert row["strict_type"] == "array_api_strict" and row["strict_device_same"]
        assert row["strict_values"] == [total] * 3
        assert row["bcast"] == [n - 1.0] * 4 and row["bcast_torch"] == [n - 1.0] * 2
        assert row["gather"] == [{"r": r} for r in range(n)]
        assert row["bobj"] == f"from {n - 1}"
    assert all(row["digests"] == rows[0]["digests"] for row in rows)  # bit-identical


def test_mpi_exception_on_one_rank_ends_the_job(tmp_path):
    out, seconds, rows = _run(2, "raise", tmp_path)
    assert out.returncode != 0
    assert seconds < 10
    assert "anycnn: rank 1/2 failed: ValueError: boom on purpose" in out.stderr
    assert "Traceback" in out.stderr
    assert [row["state"] for row in rows] == ["waiting"]  # rank 0 was blocked


def test_mpi_killed_rank_ends_the_job(tmp_path):
    out, seconds, rows = _run(2, "kill", tmp_path)
    assert out.returncode != 0
    assert seconds < 10
    assert [row["state"] for row in rows] == ["waiting"]


def test_mpi_bind_to_cores_splits_the_node(tmp_path):
    out, _, rows = _run(2, "bind", tmp_path)
    assert out.returncode == 0, out.stderr
    cpus = sorted(os.sched_getaffinity(0))
    expected = [launch._slice(cpus, r, 2) for r in range(2)]
    assert [row["affinity"] for row in rows] == expected
    assert [row["threads"] for row in rows] == [len(part) for part in expected]


def test_workers_command_runs_anycnn_on_two_ranks():
    mpiexec_or_skip()
    cmd = launch.workers_command(2, ["--version"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n").count("anycnn 0.1.0") == 2


@pytest.mark.usefixtures("fake_dtype_names")
def test_nccl_sends_host_buffers_through_mpi():
    from anycnn.dist.nccl import NCCLCommunicator

    cupy, nccl, _ = _fake_modules(gpus=2)
    mpi = FakeMPIComm(rank=1, size=2)
    seen = []
    mpi.allreduce_ = lambda buf: seen.append(("allreduce", buf)) or buf * 2
    mpi.broadcast_ = lambda buf, root=0: seen.append(("broadcast", buf)) or buf
    comm = NCCLCommunicator(mpi, cupy=cupy, nccl=nccl)
    flags = np.ones(3)
    np.testing.assert_array_equal(comm.allreduce_(flags), [2.0, 2.0, 2.0])
    assert comm.broadcast_(flags) is flags
    assert [kind for kind, _ in seen] == ["allreduce", "broadcast"]
    assert comm.comm.calls == []  # NCCL itself was not used
