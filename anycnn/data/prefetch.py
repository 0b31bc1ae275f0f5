"""Prefetch: build the next batches in a background thread while the training step runs.

:class:`Prefetcher` runs a producer (a generator function taking a stop flag) in a daemon thread
and hands its items over through a bounded queue (``depth`` items, 2 for the loader), so the
producer is never more than ``depth`` batches ahead. The loader's producer receives a batch from
its workers, applies the host-side preprocessing and copies it to the device
(:func:`anycnn.backend.asarray`), so both overlap the step. An exception in the producer is
raised by the consuming iteration; closing the iteration (``break``, an exception, garbage
collection) stops the thread and waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_POLL_S = 0.1


class Prefetcher:
    """Iterate over ``produce(stop)`` run ahead by up to ``depth`` items in a thread.

    Args:
        produce: called once in the thread with a :class:`threading.Event`; yields the items and
            should return soon after the event is set.
        depth: the queue's size, >= 1.
    """

    def __init__(self, produce: Callable[[threading.Event], Iterator[Any]],
                 depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), daemon=True,
                                        name="anycnn-prefetch")
        self._thread.start()

    def _run(self, produce: Callable[[threading.Event], Iterator[Any]]) -> None:
        try:
            for item in produce(self._stop):
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, who raises it
            self._put(("error", exc))

    def _put(self, message: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer and wait for the thread to end."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
