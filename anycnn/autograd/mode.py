"""Whether gradients are recorded, per thread: :func:`no_grad`, :func:`enable_grad`, and the
recording of a forward pass whose parameters are graph leaves (:func:`recording`).

Two switches live here, both thread-local (a data-loading thread never sees another thread's
forward pass):

- **grad mode** (on by default). :func:`no_grad` turns it off for inference: forward-only
  modules then run their ``forward`` on plain arrays and keep nothing for a backward pass, and
  calling a module returns plain arrays.
- **the recording**: set while a forward-only module's own ``forward`` code runs. During it,
  ``Parameter.data`` of every trainable parameter is that parameter's leaf
  :class:`~anycnn.autograd.variable.Variable` (one per parameter and recording), so gradients
  reach ``Parameter.grad``. A built-in layer's forward runs *unrecorded*
  (:func:`unrecorded`): it sees plain arrays and keeps its hand-written backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class _State(threading.local):
    grad: bool = True
    recording: Any = None  # the active Recording, or None
    trace: list | None = None  # operations kept by tracing(), or None


STATE = _State()


def is_grad_enabled() -> bool:
    """Whether gradients are being recorded on this thread (default True)."""
    return STATE.grad


class _GradMode(contextlib.ContextDecorator):
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._before: list[bool] = []

    def __enter__(self) -> None:
        self._before.append(STATE.grad)
        STATE.grad = self.enabled

    def __exit__(self, *exc: Any) -> None:
        STATE.grad = self._before.pop()


def no_grad() -> _GradMode:
    """Context manager (and decorator) that records no gradients: inference, evaluation.

    Inside it a forward-only module runs its ``forward`` on plain arrays and keeps nothing for
    backward, and ``model(x)`` returns a plain array. Built-in layers run as always."""
    return _GradMode(False)


def enable_grad() -> _GradMode:
    """Context manager (and decorator) that records gradients again inside :func:`no_grad`."""
    return _GradMode(True)


class Recording:
    """One forward pass being recorded: the leaf Variable of each trainable parameter read
    in it (by ``id``; the parameter itself is kept alive by the leaf)."""

    __slots__ = ("called", "deferred", "leaves")

    def __init__(self) -> None:
        self.leaves: dict[int, Any] = {}
        #: the modules called in it (to tell a model about layers it cannot see)
        self.called: list[Any] = []
        #: Deferred outputs made in it (:mod:`anycnn.nn.deferred`): the ones nobody read are
        #: computed when the recording ends, for the side effects of their pass
        self.deferred: list[Any] = []


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record the enclosed forward code (re-entrant: a nested forward-only module joins the
    recording around it, so a parameter read twice is one leaf)."""
    outer = STATE.recording
    if outer is not None:
        yield outer
        return
    STATE.recording = rec = Recording()
    try:
        yield rec
        for d in rec.deferred:
            if d.pending and not d.absorbed:
                d.data  # noqa: B018 - computes it
    finally:
        STATE.recording = None


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """No recording inside (a built-in layer's own forward: plain arrays in and out)."""
    outer, STATE.recording = STATE.recording, None
    try:
        yield
    finally:
        STATE.recording = outer


@contextlib.contextmanager
def tracing() -> Iterator[list]:
    """Keep every recorded operation of the enclosed forward code, in order, as
    :class:`~.variable.TraceEntry` items of the yielded list (constants included): what the
    ONNX export of a module written as code translates."""
    outer, STATE.trace = STATE.trace, []
    try:
        yield STATE.trace
    finally:
        STATE.trace = outer
