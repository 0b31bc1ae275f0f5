"""Seeded host randomness.

The Array API standard has no random numbers, so anycnn draws every random value (initial weights,
dropout masks, shuffles) on the host from a :class:`numpy.random.Generator` and moves it to the
device. The same seed therefore gives bit-identical values on every backend.
"""

from __future__ import annotations

import numpy as np

_generator: np.random.Generator | None = None


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed anycnn's global generator (like ``torch.manual_seed``) and return it."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def default_generator() -> np.random.Generator:
    """The global generator (seeded with 0 on first use if never seeded)."""
    global _generator
    if _generator is None:
        _generator = np.random.default_rng(0)
    return _generator


def get_state() -> dict:
    """The global generator's state, a JSON-serialisable dict (for checkpoints)."""
    return default_generator().bit_generator.state


def set_state(state: dict) -> None:
    """Restore a state returned by :func:`get_state`."""
    default_generator().bit_generator.state = state
