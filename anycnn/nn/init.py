"""Weight initializers, drawn on the host (see :mod:`anycnn.random`).

Each initializer takes ``(shape, fan_in, fan_out, rng)`` and returns a float64 NumPy array; the
layer casts it to its dtype and moves it to the backend, so a seed gives the same weights
everywhere. Fans: for ``Dense`` (in, out) they are ``in`` and ``out``; for ``Conv2D`` (kh, kw, in,
out) they are ``kh*kw*in`` and ``kh*kw*out``.

Defaults: ``Conv2D`` and ``Dense`` use ``he_uniform`` weights (suited to ReLU networks) and zero
biases; ``BatchNorm2D`` starts at weight 1, bias 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

Initializer = Callable[[tuple[int, ...], int, int, np.random.Generator], np.ndarray]


def he_uniform(shape, fan_in, fan_out, rng):
    """U(-b, b) with b = sqrt(6 / fan_in) (Kaiming uniform, ReLU gain)."""
    bound = math.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape)


def he_normal(shape, fan_in, fan_out, rng):
    """N(0, 2 / fan_in) (Kaiming normal, ReLU gain)."""
    return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)


def glorot_uniform(shape, fan_in, fan_out, rng):
    """U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) (Xavier uniform)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def glorot_normal(shape, fan_in, fan_out, rng):
    """N(0, 2 / (fan_in + fan_out)) (Xavier normal)."""
    return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), size=shape)


def torch_default(shape, fan_in, fan_out, rng):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv2d parameters."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def zeros(shape, fan_in, fan_out, rng):
    """All zeros."""
    return np.zeros(shape)


def ones(shape, fan_in, fan_out, rng):
    """All ones."""
    return np.ones(shape)


INITIALIZERS: dict[str, Initializer] = {
    f.__name__: f
    for f in (he_uniform, he_normal, glorot_uniform, glorot_normal, torch_default, zeros, ones)
}


def get_initializer(spec: str | Initializer) -> Initializer:
    """An initializer from its name or a callable with the same signature."""
    if callable(spec):
        return spec
    try:
        return INITIALIZERS[spec]
    except KeyError:
        raise ConfigError(
            f"unknown initializer {spec!r}; valid names: {', '.join(INITIALIZERS)}"
        ) from None
