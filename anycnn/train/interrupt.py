"""Stopping a training run cleanly on SIGINT (Ctrl-C) and SIGTERM: "interrupting loses nothing".

:class:`StopOnSignal` turns the first signal into :meth:`Trainer.request_stop
<anycnn.train.trainer.Trainer.request_stop>`: the step in progress finishes (a data-parallel
run agrees on the step over its ranks), :meth:`~anycnn.train.trainer.Trainer.fit` returns, and
the caller saves. ``anycnn train`` wraps ``fit`` in one (:mod:`anycnn.cli.train`: a second
signal exits the process at once); :meth:`Trainer.fit <anycnn.train.trainer.Trainer.fit>`
installs one itself (:func:`catch_signals`) where nobody else handles the signals, saves at
the step and raises ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(143)`` (SIGTERM) from
``fit`` instead of from inside a thread pool (:func:`interrupted`); a second signal there
interrupts at once, without ending the process (a notebook's kernel survives).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

#: the signals a run stops on
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """First SIGINT/SIGTERM: ask ``trainer`` to stop after the current step (rank 0 says so on
    stderr). Second: ``second="exit"`` ends the process at once (``os._exit(128 + signum)``;
    checkpoints are written atomically, so nothing on disk is corrupted), ``second="raise"``
    raises at once (``KeyboardInterrupt``; ``SystemExit`` for SIGTERM).

    Args:
        trainer: what to stop (anything with ``request_stop`` and ``comm``).
        second: ``"exit"`` or ``"raise"``, as above.
        signals: the signals to handle (default both).

    Attributes:
        signum: the first signal received, else None.
    """

    def __init__(self, trainer: Any, *, second: str = "exit",
                 signals: tuple[int, ...] = SIGNALS) -> None:
        self.trainer = trainer
        self.second = second
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if self.second == "exit":
                print(f"{_off_the_bar()}anycnn: second signal, exiting now", file=sys.stderr,
                      flush=True)
                os._exit(128 + signum)
            self._restore()  # a third goes to the handlers from before
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        if self.trainer.comm.rank == 0:  # mpiexec forwards the signal to every rank
            again = "exit" if self.second == "exit" else "interrupt"
            print(f"{_off_the_bar()}anycnn: {signal.Signals(signum).name} received: stopping "
                  f"after this step (send it again to {again} at once)", file=sys.stderr,
                  flush=True)
        self.trainer.request_stop(signal.Signals(signum).name)

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (what tqdm's ``disable=None`` asks of the stream the
    progress bars go to)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _off_the_bar() -> str:
    """``"\\n"`` when stderr is a terminal (the line ends the progress bar and the echoed
    ``^C``), else ``""``: in a pipe or a log file there is no bar, and no blank line."""
    return "\n" if stderr_is_terminal() else ""


def _unhandled(sig: int) -> bool:
    """Whether ``sig`` still has Python's default handling (nobody else handles it)."""
    current = signal.getsignal(sig)
    return current is (signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def catch_signals(trainer: Any) -> contextlib.AbstractContextManager:
    """A :class:`StopOnSignal` (``second="raise"``) for the signals that nobody handles, or a
    context doing nothing (not the main thread, or every signal has its own handler: e.g.
    ``anycnn train``'s, or the user's). Its value has ``signum`` either way."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext(StopOnSignal(trainer, signals=()))
    return StopOnSignal(trainer, second="raise",
                        signals=tuple(s for s in SIGNALS if _unhandled(s)))


def interrupted(trainer: Any, signum: int, saved: Any) -> BaseException:
    """Say (rank 0, one line on stderr) where a run stopped by ``signum`` is and how to resume
    it, and return the exception :meth:`~anycnn.train.trainer.Trainer.fit` raises:
    ``KeyboardInterrupt`` for SIGINT, ``SystemExit(128 + signum)`` otherwise.

    Args:
        saved: the checkpoint written at the step, or None (nothing to save to).
    """
    name = signal.Signals(signum).name
    where = f"epoch {trainer.epoch + 1}, step {trainer.step}"
    if saved is not None:
        line = (f"anycnn: {name}: training stopped at {where}; checkpoint saved to {saved}. "
                f"Resume with trainer.resume({str(saved)!r}) and the same fit(...) call")
    else:
        line = (f"anycnn: {name}: training stopped at {where}; nothing saved (no "
                "checkpoint_path). This trainer holds the run: fit(...) again goes on, "
                "trainer.save(PATH) keeps it")
    if trainer.comm.rank == 0:
        print(line, file=sys.stderr, flush=True)
    if signum == signal.SIGINT:
        return KeyboardInterrupt(f"training stopped by {name} at {where}")
    return SystemExit(128 + signum)
