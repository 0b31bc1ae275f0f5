""":class:`BackendSpec`: everything anycnn needs to know about one array library, in one record.

Each module of :mod:`anycnn.backends` (``numpy.py``, ``torch.py``, ...) defines one, named
``SPEC``; :mod:`anycnn.backend` reads these records instead of testing backend names. Nothing
here imports an array library: the callables a record holds import theirs when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _always(_device: Any) -> bool:
    return True


@dataclass(frozen=True)
class BackendSpec:
    """The description of one backend.

    Attributes:
        name: the ``ANYCNN_BACKEND`` value (also the requirements file ``backends/NAME.txt``
            and the top-level module whose ``__version__`` ``anycnn info`` shows).
        namespace: the module imported as the backend's Array API namespace.
        order: position in lists of backends (valid names, ``anycnn info``); ties by name.
        owns_namespace: ``xp -> bool``: is ``xp`` this library's namespace?
        owns_array: ``x -> bool``: is ``x`` this library's array? (must not import the library)
        install_note: said after ``pip install -r backends/NAME.txt`` in error messages.
        mutable: in-place operators (``a -= b``) change the array; False where they make a new
            one (JAX), so updates must write new arrays back.
        compiles: the training step can be compiled (``Trainer(compile=True)``, ``jax.jit``).
        auto: the role in ``ANYCNN_BACKEND=auto``: ``"first"`` (taken when
            :attr:`count_devices` finds a device), ``"fallback"`` (taken otherwise), or None.
        count_devices: ``() -> (devices, reason)``, run before the namespace is imported; a
            backend with one is usable only when it finds a device. Never raises.
        setup: ``() -> None``, run after each import of the namespace (e.g. JAX's float64).
        default_device: ``xp -> device`` new arrays are put on (default: where
            ``xp.empty(0)`` lands).
        host_copy: ``x -> numpy.ndarray`` (default: ``numpy.asarray``, which needs
            ``__array__`` or DLPack).
        on_host: ``device -> bool``: do arrays on ``device`` live in host memory (reading
            them back costs nothing, nothing needs synchronising)?
        synchronize: ``device -> None``: wait for queued work on ``device`` (None: nothing is
            ever queued).
        contiguous_host: the namespace's ``asarray`` cannot wrap negative-stride NumPy views.
    """

    name: str
    namespace: str
    order: int
    owns_namespace: Callable[[Any], bool]
    owns_array: Callable[[Any], bool]
    install_note: str = ""
    mutable: bool = True
    compiles: bool = False
    auto: str | None = None
    count_devices: Callable[[], tuple[int, str]] | None = None
    setup: Callable[[], None] | None = None
    default_device: Callable[[Any], Any] | None = None
    host_copy: Callable[[Any], Any] | None = None
    on_host: Callable[[Any], bool] = _always
    synchronize: Callable[[Any], None] | None = None
    contiguous_host: bool = False

    @property
    def install_hint(self) -> str:
        """How to install it: ``pip install -r backends/NAME.txt`` plus the note."""
        hint = f"pip install -r backends/{self.name}.txt"
        return f"{hint}  ({self.install_note})" if self.install_note else hint
