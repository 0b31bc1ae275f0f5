"""anycnn: convolutional networks written once against the Python Array API.

The same layers run on NumPy, CuPy, PyTorch tensors and array-api-strict; pick one with the
``ANYCNN_BACKEND`` environment variable or :func:`use_backend`. Importing anycnn imports no backend
beyond NumPy and reads no environment variable: the backend is resolved at first use.
"""

from . import functional, init, layers, losses, optim
from .backend import Backend, asarray, get_backend, to_numpy, use_backend
from .errors import (
    AnycnnError,
    BackendError,
    BackendMismatchError,
    CheckpointError,
    ConfigError,
    DataError,
    ShapeError,
    TrainingError,
)
from .module import Module, Parameter
from .random import manual_seed
from .sequential import Sequential

__version__ = "0.1.0"

__all__ = [
    "AnycnnError",
    "Backend",
    "BackendError",
    "BackendMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Module",
    "Parameter",
    "Sequential",
    "ShapeError",
    "TrainingError",
    "__version__",
    "asarray",
    "functional",
    "get_backend",
    "init",
    "layers",
    "losses",
    "manual_seed",
    "optim",
    "to_numpy",
    "use_backend",
]
