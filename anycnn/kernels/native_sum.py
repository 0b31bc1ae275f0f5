"""The sum of a stack of partial results, ``parts.sum(axis=0)``, compiled (NumPy, float).

The weight-gradient kernel (:func:`~anycnn.kernels.native.conv2d_weight_grad`) writes one
part per group of images; their sum was ``parts.sum(axis=0)`` in NumPy on the calling thread
alone (resnet20 at batch 32: eight parts of up to 3x3x64x64 floats per layer, about 0.5 ms
of each step). :func:`sum_parts` adds them on the kernels' threads, each task a slice of the
elements, vectorised, the parts added one after the other to zero as NumPy's sum over
the first axis of a C-contiguous array adds them: the same bits (``tests/test_native_sum.py``).
"""

from __future__ import annotations

import numpy as np

from . import kernel_cache, native

#: elements per task at most (a slice of every part; 16 KiB of float32 per part): a task
#: takes the largest power of two up to this that divides the part's size
TASK_ELEMENTS = 4096

#: below this many elements in all the NumPy sum is used (the same bits; a compiled call and
#: waking the threads cost more than adding a few thousand floats)
MIN_ELEMENTS = 1 << 16


@kernel_cache.pipeline
def _parts_pipeline(dtype: np.dtype, task: int):
    """``out[k, e] = 0 + parts[0, k, e] + parts[1, k, e] + ...`` (left to right) for
    ``parts`` (P, K / task, task) (Halide's axes are NumPy's reversed): a task per row ``k``
    of ``task`` elements, a multiple of the vector lanes (no tail: a guarded tail under
    ``strict_float`` crashed Halide 21's AVX-512 code)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    lanes = native.vector_lanes(dtype)
    parts = hl.ImageParam(t, 3, "parts")
    e, k = hl.Var("e"), hl.Var("k")
    r = hl.RDom([hl.Range(0, parts.dim(2).extent())], "r")
    out = hl.Func("parts_sum")
    out[e, k] = hl.cast(t, 0)  # NumPy's sum starts from its identity: -0.0 parts sum to 0.0
    out[e, k] = hl.strict_float(out[e, k] + parts[e, k, r.x])
    out.bound(e, 0, task).vectorize(e, lanes).parallel(k)
    out.update().reorder(e, r.x, k).vectorize(e, lanes).parallel(k)
    return out, {"parts": parts}, {}


def _task(size: int, lanes: int) -> int:
    """The elements per task for parts of ``size`` elements (0: none fits)."""
    task = TASK_ELEMENTS
    while task >= lanes and size % task:
        task //= 2
    return task if task >= lanes else 0


def sum_parts(parts: np.ndarray) -> np.ndarray:
    """``parts.sum(axis=0)`` for a float array ``parts`` (P, ...) with P >= 1, bit for bit;
    compiled where the kernels are on, ``parts`` is C-contiguous and writeable, holds
    :data:`MIN_ELEMENTS` or more and its parts' size is a multiple of the vector lanes."""
    if (parts.size < MIN_ELEMENTS or not parts.flags.c_contiguous or not parts.flags.writeable
            or not native.available(np, parts.dtype)):
        return parts.sum(axis=0)
    size = parts.size // parts.shape[0]
    task = _task(size, native.vector_lanes(parts.dtype))
    if not task:
        return parts.sum(axis=0)
    out = np.empty(parts.shape[1:], dtype=parts.dtype)
    _parts_pipeline(parts.dtype, task).run(
        {"parts": parts.reshape(parts.shape[0], size // task, task)}, {},
        [out.reshape(size // task, task)])
    return out
