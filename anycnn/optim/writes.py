"""How an optimizer writes its arithmetic: in place, or into new arrays.

An update rule is written once, as a *kernel* ``kernel(*arrays, ops=IN_PLACE) -> new arrays``
whose writes go through ``ops``: :data:`IN_PLACE` changes the arrays it is given and returns them
(NumPy, CuPy, torch, array-api-strict), :data:`NEW_ARRAYS` leaves them alone and returns new
ones (JAX: ``a -= b`` would only rebind a name). Both do the same arithmetic, so both give the
same numbers. :func:`apply` runs a kernel with the right one; in place on NumPy it runs on row
shards in parallel (:func:`anycnn.kernels.fastpath.update_rows`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..kernels import fastpath


class InPlace:
    """Writes that change their first argument and return it."""

    in_place = True

    @staticmethod
    def scale(a: Any, s: float) -> Any:
        """``a * s``, into ``a``."""
        a *= s
        return a

    @staticmethod
    def scale_add(a: Any, s: float, b: Any) -> Any:
        """``a * s + b``, into ``a``."""
        a *= s
        a += b
        return a

    @staticmethod
    def sub(a: Any, b: Any) -> Any:
        """``a - b``, into ``a``."""
        a -= b
        return a


class NewArrays:
    """The same writes as :class:`InPlace`, returning new arrays and changing none."""

    in_place = False

    @staticmethod
    def scale(a: Any, s: float) -> Any:
        """``a * s``, a new array."""
        return a * s

    @staticmethod
    def scale_add(a: Any, s: float, b: Any) -> Any:
        """``a * s + b``, a new array."""
        return a * s + b

    @staticmethod
    def sub(a: Any, b: Any) -> Any:
        """``a - b``, a new array."""
        return a - b


IN_PLACE = InPlace()
NEW_ARRAYS = NewArrays()


def apply(xp: Any, ops: InPlace | NewArrays, kernel: Callable[..., tuple], written: tuple,
          *read: Any) -> tuple:
    """``kernel(*written, *read, ops=ops)``, which returns the new values of ``written``: those
    arrays changed (:data:`IN_PLACE`; on NumPy the kernel runs on row shards of large arrays in
    parallel) or new ones (:data:`NEW_ARRAYS`). The kernel must treat every element alike, and
    default ``ops`` to :data:`IN_PLACE` (the row shards are passed without it)."""
    if ops.in_place:
        fastpath.update_rows(xp, kernel, *written, *read)
        return written
    return kernel(*written, *read, ops=ops)
