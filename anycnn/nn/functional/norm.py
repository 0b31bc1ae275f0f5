"""Normalisation of channels-last activations: BatchNorm (over N, H, W), GroupNorm and
LayerNorm (per sample), forward and backward.

BatchNorm works on rows ``(M, C)`` of the channels-last input. Its per-channel passes are the
portable functions below, each a kernel dispatch point (:mod:`anycnn.kernels.dispatch`): on
NumPy cache-sized chunks of several operations per pass, or compiled kernels that keep the
input rows and the mean instead of ``xhat`` and normalise again as they read
(``prefers("batch_norm_from_rows")`` picks that formulation). Without synchronised statistics
a whole BatchNorm pass is offered to the kernels first (``batch_norm``, ``batch_norm_backward``:
an array library's own operator), which keep the input rows and the mean in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import device

from ...backend import namespace_of, to_numpy
from ...kernels.dispatch import DECLINE, attempt, overridable, prefers
from .primitives import add_relu, relu_grad

# --------------------------------------------------------------------------------------------
# BatchNorm's per-channel passes over rows (M, C)


@overridable
def channel_sums(rows: Any) -> Any:
    """``sum(rows, axis=0)``: (C,)."""
    return namespace_of(rows).sum(rows, axis=0)


@overridable
def centre_rows(rows: Any, mean: Any) -> tuple[Any, Any]:
    """``(centred, sum of squares)``: ``centred = rows - mean`` and the sum over the rows of
    ``centred * centred`` (C,), for ``rows`` (M, C) and ``mean`` (C,)."""
    centred = rows - mean
    return centred, namespace_of(rows).sum(centred * centred, axis=0)


@overridable
def squared_deviations(rows: Any, mean: Any) -> Any:
    """``sum((rows - mean)**2, axis=0)`` (C,), no centred copy kept."""
    return centre_rows.portable(rows, mean)[1]


@overridable
def channel_moments(rows: Any) -> tuple[Any, Any]:
    """``(sums, squares)``: ``sum(rows, axis=0)`` and ``sum((rows - mean)**2, axis=0)`` for
    ``mean = sums / M``, each (C,), for ``rows`` (M, C) (a kernel may take both in one
    sweep)."""
    sums = channel_sums(rows)
    return sums, squared_deviations(rows, sums / rows.shape[0])


@overridable
def normalize_rows(centred: Any, inv_std: Any, gamma: Any, beta: Any,
                   relu: bool) -> tuple[Any, Any]:
    """``(xhat, y)``: ``xhat = centred * inv_std``, ``y = xhat * gamma + beta``, then
    ``maximum(y, 0)`` when ``relu``; per-channel vectors (C,) against rows (M, C). A kernel
    may write ``xhat`` over ``centred``, which must be owned."""
    xhat = centred * inv_std
    y = xhat * gamma + beta
    return xhat, (namespace_of(y).maximum(y, 0.0) if relu else y)


@overridable
def normalize_from_rows(rows: Any, mean: Any, inv_std: Any, gamma: Any, beta: Any,
                        relu: bool, addend: Any = None) -> Any:
    """``y = xhat * gamma + beta`` for ``xhat = (rows - mean) * inv_std`` (plus ``addend``,
    shaped as ``rows``; then ``maximum(y, 0)`` with ``relu``)."""
    y = (rows - mean) * inv_std * gamma + beta
    if addend is not None:
        y = y + addend
    return namespace_of(y).maximum(y, 0.0) if relu else y


@overridable
def norm_grad_sums(dy: Any, xhat: Any, out: Any = None) -> tuple[Any, Any, Any]:
    """``(g, dbeta, dgamma)`` for rows (M, C): ``g = dy``, or the gradient through a ReLU whose
    output was ``out``; ``dbeta = sum(g, axis=0)``, ``dgamma = sum(g * xhat, axis=0)``."""
    xp = namespace_of(dy, xhat)
    g = dy if out is None else relu_grad(out, dy)
    return g, xp.sum(g, axis=0), xp.sum(g * xhat, axis=0)


@overridable
def grad_sums_from_rows(dy: Any, out: Any, x: Any, mean: Any, inv_std: Any,
                        affine: Any = None) -> tuple[Any, Any]:
    """``(sum(g, axis=0), sum(g * xhat, axis=0))`` for ``g = dy``, or ``dy`` where ``out`` (a
    fused ReLU's output, or None) is positive, and ``xhat = (x - mean) * inv_std``.
    ``affine``: the forward's ``(gamma, beta)``, with which a kernel may take the sign of
    ``out`` again from ``xhat * gamma + beta`` (the same bits) instead of reading ``out``."""
    _, dbeta, dgamma = norm_grad_sums.portable(dy, (x - mean) * inv_std, out)
    return dbeta, dgamma


@overridable
def norm_input_grad(g: Any, xhat: Any, scale: Any, dsum: Any, gsum: Any, count: int,
                    owned: bool = False) -> Any:
    """BatchNorm's input gradient ``(scale / count) * (count * g - dsum - xhat * gsum)`` for
    rows (M, C) and per-channel ``scale``, ``dsum``, ``gsum`` (C,); a kernel may write it over
    ``g`` when ``owned``."""
    return (scale / count) * (count * g - dsum - xhat * gsum)


@overridable
def input_grad_from_rows(dy: Any, out: Any, x: Any, mean: Any, inv_std: Any, k1: Any, k2: Any,
                         k3: Any, affine: Any = None) -> Any:
    """``g * k1 - (xhat * k3 + k2)`` for ``g = dy``, or ``dy`` where ``out`` (a fused ReLU's
    output, or None) is positive, and ``xhat = (x - mean) * inv_std`` (``affine`` as for
    :func:`grad_sums_from_rows`)."""
    g = dy if out is None else relu_grad(out, dy)
    return g * k1 - (((x - mean) * inv_std) * k3 + k2)


@dataclass
class BatchNormCtx:
    xhat: Any  # normalised input, (M, C) rows of the channels-last input; with ``mean``, the
    # input rows themselves (the compiled kernels normalise them again as they read them)
    inv_std: Any
    count: int  # values per channel the statistics were taken over (all ranks')
    training: bool
    share: float = 1.0  # this rank's part of ``count`` (synchronised statistics)
    out: Any = None  # the output (M, C) when a ReLU was applied to it (``relu=True``)
    mean: Any = None  # the mean ``xhat`` holds the input rows around (compiled kernels)
    affine: Any = None  # with ``out`` and ``mean``: the forward's (gamma, beta), copies, from
    # which the compiled backward takes the ReLU's mask again instead of reading ``out``


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                       reduce=None, relu=False, addend=None):
    """PyTorch ``batch_norm`` on channels-last input, followed by a ReLU when ``relu``.

    ``addend`` (shaped as ``x``; a residual sum's shortcut output) is added to the normalised
    values before the ReLU, in the same pass. The ReLU's mask is then not kept: the backward
    takes the gradient of the sum, already through its ReLU, as a residual block computes it.

    In training, normalises with the batch statistics and returns updated running statistics
    (``running_var`` uses the unbiased batch variance); in eval, uses the running statistics.
    Returns ``(y, ctx, new_running_mean, new_running_var)``.

    ``reduce`` (training only; data-parallel synchronised statistics): a function that sums a
    1-D array over every rank (a communicator's ``allreduce_``). The mean and the variance are
    then those of all ranks' batches together: two calls, ``(C + 1,)`` (sums and count) and
    ``(C,)`` (squared deviations from the global mean), plus one host read of the count.

    The per-channel passes are the dispatch points above (NumPy kernels: GEMV sums and one
    cache-sized chunk at a time, the ReLU inside the same pass). Without ``reduce``, a kernel
    (``batch_norm``) is offered the whole call first.
    """
    xp = namespace_of(x, gamma, beta, running_mean, running_var)
    c = x.shape[-1]
    if reduce is None:
        got = attempt("batch_norm", x, gamma, beta, running_mean, running_var, training,
                      momentum, eps, relu, addend)
        if got is not DECLINE:  # the context keeps the input rows and the mean (and, when
            # the kernel gives them, copies of the gamma and beta it normalised with)
            y, mean, inv_std, running_mean, running_var, *affine = got
            rows = xp.reshape(x, (-1, c))
            masked = relu and addend is None
            out = xp.reshape(y, (-1, c)) if masked else None
            ctx = BatchNormCtx(rows, inv_std, rows.shape[0], training, 1.0, out, mean,
                               affine[0] if affine and masked else None)
            return y, ctx, running_mean, running_var
    rows = xp.reshape(x, (-1, c))
    compiled = prefers("batch_norm_from_rows", rows)
    count = rows.shape[0]
    share = 1.0
    if training and compiled and reduce is None:  # both statistics in one sweep
        sums, squares = channel_moments(rows)
        mean, centred = sums / count, rows
    elif training:
        sums = channel_sums(rows)
        if reduce is not None:
            local = count
            total = reduce(xp.concat([sums, xp.full((1,), float(count), dtype=x.dtype,
                                                    device=device(x))]))
            count = round(float(to_numpy(total[-1])))
            sums = total[:-1]
            share = local / count
        mean = sums / count
        if compiled:  # no centred copy: the normalising pass subtracts the mean itself
            centred, squares = rows, squared_deviations(rows, mean)
        else:
            centred, squares = centre_rows(rows, mean)
        if reduce is not None:
            squares = reduce(squares)
    if training:
        var = squares / count
        unbiased = var * (count / max(count - 1, 1))
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased
    else:
        mean = running_mean
        centred = rows if compiled else rows - running_mean
        var = running_var
    inv_std = 1.0 / xp.sqrt(var + eps)
    plus = None if addend is None else xp.reshape(addend, rows.shape)
    masked = relu and plus is None  # the ReLU's mask belongs to this layer's backward
    if compiled:  # xhat is not stored: the backward kernels compute it again from the rows
        y = normalize_from_rows(rows, mean, inv_std, gamma, beta, relu, plus)
        affine = (xp.asarray(gamma, copy=True), xp.asarray(beta, copy=True)) if masked else None
        ctx = BatchNormCtx(rows, inv_std, count, training, share, y if masked else None, mean,
                           affine)
    else:
        xhat, y = normalize_rows(centred, inv_std, gamma, beta, masked)
        if plus is not None:
            y = add_relu(y, plus, relu)
        ctx = BatchNormCtx(xhat, inv_std, count, training, share, y if masked else None)
    return xp.reshape(y, x.shape), ctx, running_mean, running_var


def batch_norm_backward(dy, ctx: BatchNormCtx, gamma, reduce=None):
    """``(dx, dgamma, dbeta)`` of :func:`batch_norm_forward` (through its ReLU, if it had one).

    With ``reduce`` (the forward's; synchronised statistics), ``dy`` is the gradient of this
    rank's *mean* loss, and the objective is the global batch's mean loss, i.e. each rank's loss
    weighted by its share ``w`` of the batch (how :mod:`anycnn.train.parallel` combines the
    ranks' gradients). One call sums ``(2C,)``: ``w * dbeta`` and ``w * dgamma`` of every rank;
    ``dx`` is the global objective's input gradient divided by ``w`` (the trainer multiplies
    every rank's parameter gradients by ``w``), ``dgamma``/``dbeta`` are this rank's own.
    """
    xp = namespace_of(dy, gamma)
    if ctx.mean is not None and reduce is None:
        got = attempt("batch_norm_backward", dy, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std, gamma,
                      ctx.training, ctx.affine)
        if got is not DECLINE:
            return got
    c = dy.shape[-1]
    rows = xp.reshape(dy, (-1, c))
    compiled = ctx.mean is not None and prefers("batch_norm_from_rows", rows)
    if ctx.mean is not None and not compiled:  # the kernels went off since the forward
        ctx = replace(ctx, xhat=(ctx.xhat - ctx.mean) * ctx.inv_std, mean=None)
    if compiled:  # the ReLU's gradient is applied inside both passes, never stored
        g = None
        dbeta, dgamma = grad_sums_from_rows(rows, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std,
                                            ctx.affine)
    else:
        g, dbeta, dgamma = norm_grad_sums(rows, ctx.xhat, ctx.out)
    scale = gamma * ctx.inv_std
    if not ctx.training:
        if compiled:
            zero = xp.zeros_like(scale)
            dx = input_grad_from_rows(rows, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std, scale,
                                      zero, zero, ctx.affine)
            return xp.reshape(dx, dy.shape), dgamma, dbeta
        return xp.reshape(g * scale, dy.shape), dgamma, dbeta
    dsum, gsum = dbeta, dgamma
    if reduce is not None:
        w = ctx.share
        total = reduce(xp.concat([dbeta * w, dgamma * w]))
        dsum, gsum = total[:c] / w, total[c:] / w
    if compiled:
        dx = input_grad_from_rows(rows, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std, scale,
                                  scale * dsum / ctx.count, scale * gsum / ctx.count,
                                  ctx.affine)
    else:
        dx = norm_input_grad(g, ctx.xhat, scale, dsum, gsum, ctx.count, owned=ctx.out is not None)
    return xp.reshape(dx, dy.shape), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Per-sample normalisation: GroupNorm and LayerNorm over the channels of NHWC input


@dataclass
class NormCtx:
    xhat: Any  # normalised input, shaped as the input
    inv_std: Any  # 1/sqrt(var + eps), shaped as the statistics of the view
    view: tuple[int, ...]  # the shape the statistics are taken in
    axes: tuple[int, ...]  # ... over these axes of it


def group_norm_forward(x: Any, weight: Any, bias: Any, groups: int, eps: float):
    """PyTorch's ``group_norm`` on channels-last ``x`` (N, ..., C): each sample's channels are
    split into ``groups`` consecutive groups, each normalised over its channels and all
    positions; then ``* weight + bias`` per channel (both ``(C,)`` or None). ``(y, ctx)``."""
    xp = namespace_of(x)
    c = x.shape[-1]
    view = (x.shape[0], -1, groups, c // groups)  # (N, positions, G, C/G)
    return _normalize(xp.reshape(x, view), (1, 3), weight, bias, eps, x.shape)


def layer_norm_forward(x: Any, weight: Any, bias: Any, eps: float):
    """Layer normalisation of each position's C values of channels-last ``x`` (N, ..., C)
    (ConvNeXt's LayerNorm; torch's ``layer_norm`` over the last axis); ``(y, ctx)``."""
    return _normalize(x, (x.ndim - 1,), weight, bias, eps, x.shape)


def _normalize(view: Any, axes: tuple[int, ...], weight: Any, bias: Any, eps: float, shape):
    """Normalise ``view`` over ``axes`` (biased variance), reshape to ``shape`` and apply the
    per-channel affine transform when ``weight`` is given."""
    xp = namespace_of(view, weight, bias)
    mean = xp.mean(view, axis=axes, keepdims=True)
    centred = view - mean
    var = xp.mean(centred * centred, axis=axes, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = xp.reshape(centred * inv_std, shape)
    y = xhat if weight is None else xhat * weight + bias
    return y, NormCtx(xhat, inv_std, tuple(view.shape), axes)


def norm_backward(dy: Any, ctx: NormCtx, weight: Any):
    """``(dx, dweight or None, dbias or None)`` of :func:`group_norm_forward` or
    :func:`layer_norm_forward`."""
    xp = namespace_of(dy, weight)
    outer = tuple(range(dy.ndim - 1))
    dweight = dbias = None
    dxhat = dy
    if weight is not None:
        dweight = xp.sum(dy * ctx.xhat, axis=outer)
        dbias = xp.sum(dy, axis=outer)
        dxhat = dy * weight
    g = xp.reshape(dxhat, ctx.view)
    xhat = xp.reshape(ctx.xhat, ctx.view)
    dx = ctx.inv_std * (g - xp.mean(g, axis=ctx.axes, keepdims=True)
                        - xhat * xp.mean(g * xhat, axis=ctx.axes, keepdims=True))
    return xp.reshape(dx, dy.shape), dweight, dbias


# --------------------------------------------------------------------------------------------
# Losses
