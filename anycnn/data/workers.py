"""Worker processes that build the batches of a map-style dataset (:mod:`anycnn.data.mapstyle`).

A :class:`WorkerPool` holds ``num_workers`` processes, each with its own duplex pipe, started
once and kept across epochs (:meth:`~anycnn.data.dataloader.DataLoader.close` ends them; they
also end with the loader, and with the calling process). Batch ``j`` of an iteration goes to
worker ``j % num_workers``, at most two batches per worker are outstanding, and the results are
read back in batch order, so the batches and their order never depend on the worker count. A
batch crosses the pipe pickled: ``images (B, H, W, C)`` as the dataset stores them (e.g.
``uint8``) and ``labels`` (int64 ``(B,)`` or float32 ``(B, K)``).

Start method: ``forkserver`` where the platform has it (Linux, macOS), else ``spawn``. Forking the
training process itself is unsafe: it runs thread pools (anycnn's kernel threads, the BLAS
threads), and a child forked while another thread holds a lock inherits the lock held forever.
A fork server is a fresh single-threaded process that forks the workers; it preloads this module
(NumPy and anycnn's data package, besides ``__main__``, the default), so after its first start
(about 0.5 s) new workers are ready in milliseconds. Like ``spawn``, it needs the dataset to be
picklable and its class importable: define it in a module or in a script behind
``if __name__ == "__main__":``, not interactively. Workers ignore SIGINT: Ctrl-C is the calling
process's to handle, and the workers end when it closes their pipes.

The next epoch starts early: once every batch of an iteration has been asked for, the loader
passes the next epoch's first batches (the same seed, the epoch number plus one, from batch 0),
and the workers build them while the step finishes this epoch. The next iteration takes them
only when its first tasks are exactly those (same batch numbers and example indices, seed and
epoch): a resumed run (``iter_from``), a changed shard or ``set_epoch`` to another epoch
leaves them unread, as batches of an abandoned iteration are.

Priority (:mod:`anycnn.data.priority`): each worker adds ``nice`` (the loader's ``worker_nice``,
5 by default) to its nice value when it starts, and on Linux asks for 0.1 ms time slices. On a
machine whose cores the training step keeps busy, a worker decoding at the step's priority takes
its time slices from the step's threads, and a parallel region waits for its slowest thread; a
little lower and in short slices, the step's threads win a contended core within 0.1 ms, and the
workers decode in the gaps. Only a little lower: at nice 5 a worker still gets about a third of
a busy core's share, so it keeps up when other programs load the machine, where nice 19 or
Linux's ``SCHED_IDLE`` starved the workers and the step then waited for its batches (measured
with ``tools/bench_mapstyle.py``).

Errors end the iteration, never hang it: an exception in a worker (in ``__getitem__`` or while
unpickling the dataset) comes back as a :class:`~anycnn.errors.DataError` holding the worker's
traceback; a worker that exits (``os._exit``, a crash, the out-of-memory killer) is seen through
its process sentinel and reported with its exit code (exit code 1 before the worker's first
message adds a hint: a script starting workers must keep its training under ``if __name__ ==
"__main__":``, or each worker, importing the script, fails while starting). Either way the
pool is shut down and the next iteration starts a new one.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
import traceback
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from . import priority
from .mapstyle import WorkerInfo, batch_seed, fetch

_POLL_S = 0.1  # how often a wait for a batch looks at the stop flag
_PRELOAD = ["__main__", __name__]
_preload_lock = threading.Lock()
_preloaded = False


class Stopped(Exception):
    """The consumer stopped the iteration (internal: ends :meth:`WorkerPool.batches`)."""


def start_method() -> str:
    """``"forkserver"`` where available, else ``"spawn"`` (module docstring)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _context() -> Any:
    global _preloaded
    method = start_method()
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        with _preload_lock:  # applies when this process's fork server starts (once)
            if not _preloaded:
                ctx.set_forkserver_preload(_PRELOAD)
                _preloaded = True
    return ctx


class WorkerPool:
    """``num_workers`` processes building batches of ``dataset``.

    Args:
        dataset: a map-style dataset (pickled once here, unpickled in each worker).
        num_workers: process count, >= 1.
        expect: ``(image_shape, dtype, label_width)`` every sample must have (from
            ``dataset[0]``; see :func:`~anycnn.data.mapstyle.probe`).
        nice: each worker's :func:`~anycnn.data.priority.lower` at its start (0: scheduled as
            this process). See the module docstring.

    Raises:
        ConfigError: ``dataset`` cannot be pickled.
    """

    def __init__(self, dataset: Any, num_workers: int,
                 expect: tuple[tuple[int, ...], str, int | None] | None,
                 nice: int = 0) -> None:
        try:
            payload = pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ConfigError(
                f"num_workers={num_workers} sends the dataset to worker processes by pickling, "
                f"but a {type(dataset).__qualname__} cannot be pickled ({exc}). Keep no open "
                "files, locks or lambdas in it (open files in __getitem__), or use "
                "num_workers=0") from exc
        ctx = _context()
        self.num_workers = num_workers
        self._workers: list[tuple[Any, Any]] = []
        self._heard: set[int] = set()  # workers that sent a message (so started properly)
        self._token = 0
        self._next: tuple[int, int, int, list[tuple[int, np.ndarray]]] | None = None
        self.closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for w in range(num_workers):
            parent, child = ctx.Pipe(duplex=True)
            process = ctx.Process(target=_worker_main, name=f"anycnn-data-worker-{w}",
                                  args=(child, payload, w, num_workers, expect, nice),
                                  daemon=True)
            process.start()
            child.close()
            self._workers.append((process, parent))

    def close(self) -> None:
        """End the workers (closing their pipes; any still running after 1 s are terminated)."""
        self.closed = True
        self._finalizer()

    def batches(self, tasks: Sequence[tuple[int, np.ndarray]], seed: int, epoch: int,
                stop: threading.Event,
                then: tuple[Sequence[tuple[int, np.ndarray]], int, int] | None = None,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(images, labels)`` of each task ``(batch number, example indices)``, in order.

        ``then``: ``(tasks, seed, epoch)`` of the iteration expected next (the next epoch's).
        Once every task here is sent, its first ``2 * num_workers`` tasks are sent too, and
        the next call whose first tasks, seed and epoch are exactly those takes their results
        instead of asking again; any other call leaves them unread (module docstring).

        Raises:
            DataError: a worker raised or died (the pool is closed then).
            Stopped: ``stop`` was set while waiting.
        """
        if self.closed:
            raise RuntimeError("this WorkerPool is closed")
        k = self.num_workers
        ahead = min(2 * k, len(tasks))
        token, sent = self._adopt(tasks, seed, epoch)
        for j in range(sent, ahead):
            self._send(j, token, tasks[j], seed, epoch)
        sent = ahead
        for j, (b, _) in enumerate(tasks):
            if sent == len(tasks) and then is not None:  # every task sent: start the next
                self._start_next(*then)
                then = None
            result = self._receive(j % k, token, b, epoch, stop)
            if sent < len(tasks):
                self._send(sent, token, tasks[sent], seed, epoch)
                sent += 1
            yield result

    def _start_next(self, tasks: Sequence[tuple[int, np.ndarray]], seed: int,
                    epoch: int) -> None:
        """Send the first ``2 * num_workers`` of ``tasks`` under a token of their own."""
        self._token += 1
        first = [(b, np.asarray(index, np.int64)) for b, index in
                 tasks[:2 * self.num_workers]]
        for j, task in enumerate(first):
            self._send(j, self._token, task, seed, epoch)
        self._next = (self._token, seed, epoch, first)

    def _adopt(self, tasks: Sequence[tuple[int, np.ndarray]], seed: int,
               epoch: int) -> tuple[int, int]:
        """``(token, tasks already sent)``: those :meth:`_start_next` sent when they are this
        iteration's first tasks, else a new token and 0."""
        started, self._next = self._next, None
        if started is not None:
            token, their_seed, their_epoch, first = started
            if (their_seed == seed and their_epoch == epoch and len(first) <= len(tasks)
                    and all(b == c and np.array_equal(index, np.asarray(other))
                            for (b, index), (c, other) in zip(first, tasks, strict=False))):
                return token, len(first)
        self._token += 1
        return self._token, 0

    def _send(self, j: int, token: int, task: tuple[int, np.ndarray], seed: int,
              epoch: int) -> None:
        b, index = task
        _, conn = self._workers[j % self.num_workers]
        try:
            conn.send((token, b, epoch, seed, np.asarray(index, np.int64)))
        except OSError:  # the worker is gone: _receive reports it with its exit code
            pass

    def _receive(self, w: int, token: int, b: int, epoch: int,
                 stop: threading.Event) -> tuple[np.ndarray, np.ndarray]:
        process, conn = self._workers[w]
        while True:
            if stop.is_set():
                raise Stopped
            ready = wait([conn, process.sentinel], timeout=_POLL_S)
            if not ready:
                continue
            message = None
            if conn in ready or conn.poll():
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = None
            if message is None:
                self._fail(self._death(w, b, epoch))
            self._heard.add(w)
            kind, their_token, *body = message
            if their_token != token:  # left over from an iteration that was abandoned
                continue
            if kind == "error":
                self._fail(f"DataLoader worker {w} failed building batch {b + 1} of epoch "
                           f"{epoch + 1}; "
                           f"its traceback:\n{body[0]}")
            return body[0], body[1]

    def _death(self, w: int, b: int, epoch: int) -> str:
        process, _ = self._workers[w]
        process.join(timeout=1.0)
        code = process.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        message = (f"DataLoader worker {w} (pid {process.pid}) {how} while building batch "
                   f"{b + 1} of epoch {epoch + 1}: the dataset ended the process (os._exit, a "
                   "crash in native code) or the system did (out of memory?); the epoch cannot "
                   "go on")
        if code == 1 and w not in self._heard:
            message += ("; a worker that exits with code 1 before its first batch usually "
                        "failed while starting: a script whose DataLoader has num_workers > 0 "
                        "must keep its training under if __name__ == \"__main__\": (each "
                        "worker imports the script; see the worker's traceback above)")
        return message

    def _fail(self, message: str) -> None:
        self.close()
        raise DataError(message)


def _shutdown(workers: list[tuple[Any, Any]]) -> None:
    """Close the pipes (workers waiting for a task, or sending a batch, see EOF and exit), then
    join, terminating any worker still busy after 1 s."""
    for _, conn in workers:
        conn.close()
    for process, _ in workers:
        process.join(timeout=1.0)
        if process.is_alive():
            process.terminate()
            process.join(timeout=1.0)


def _worker_main(conn: Any, payload: bytes, worker: int, num_workers: int,
                 expect: tuple[tuple[int, ...], str, int | None] | None, nice: int) -> None:
    """A worker's loop: receive ``(token, batch, epoch, seed, indices)``, send back
    ``("batch", token, images, labels)`` or ``("error", token, traceback text)``; end on EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    priority.lower(nice)
    dataset, failure = None, None
    try:
        dataset = pickle.loads(payload)
    except BaseException:
        failure = ("the dataset could not be unpickled in the worker (is its class defined in "
                   "an importable module, or in a script behind if __name__ == '__main__'?):\n"
                   + traceback.format_exc())
    del payload
    try:
        while True:
            token, b, epoch, seed, index = conn.recv()
            if failure is not None:
                conn.send(("error", token, failure))
                continue
            info = WorkerInfo(worker, num_workers, batch_seed(seed, epoch, b), epoch, b)
            try:
                images, labels = fetch(dataset, index, info, False, expect)
            except BaseException:
                conn.send(("error", token, traceback.format_exc()))
                continue
            conn.send(("batch", token, images, labels))
    except (EOFError, OSError):  # the calling process closed the pipe, or is gone
        return
