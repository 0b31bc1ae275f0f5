"""Pure array operations and their backward passes, written once against the Array API.

Every ``*_forward`` returns ``(output, ctx)``; the matching ``*_backward(dy, ctx, ...)`` returns the
gradients. ``ctx`` holds only what the backward pass needs. The namespace ``xp`` is always taken
from the input arrays, so each operation runs wherever its data lives.

Layouts: images are NHWC ``(N, H, W, C)``; convolution weights are ``(kh, kw, C_in, C_out)``;
dense weights are ``(in, out)``. Scalars are Python floats so float32 stays float32.

One module per concern: :mod:`.windows` (im2col and its adjoint), :mod:`.conv`, :mod:`.pool`,
:mod:`.upsample`, :mod:`.linear`, :mod:`.activation`, :mod:`.norm`, :mod:`.loss`, and the small
operations they share (:mod:`.primitives`). None of them knows a backend: where a kernel may
compute an operation faster, the operation asks :mod:`anycnn.kernels.dispatch`, and the portable
code runs whenever the kernels decline (``ANYCNN_FASTPATH=0`` makes them always decline).
"""

from __future__ import annotations

from .activation import (
    elementwise_backward,
    erf,
    gelu_backward,
    gelu_forward,
    hardsigmoid_backward,
    hardsigmoid_forward,
    hardswish_backward,
    hardswish_forward,
    leaky_relu_forward,
    relu6_backward,
    relu6_forward,
    relu_backward,
    relu_forward,
    sigmoid_forward,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
    tanh_forward,
)
from .conv import (
    COL2IM_CHUNK_BYTES,
    SHIFTED_MAX_CHANNELS,
    ConvCtx,
    _backward_windows,
    _shifted_weight_grad_applies,
    adjoint_weight,
    columns_times_weight,
    consume,
    conv2d_backward,
    conv2d_forward,
    conv2d_grads,
    conv2d_rows,
    conv2d_rows_backward,
    conv_chunk_bytes,
    conv_columns,
    conv_input_grad,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    conv_transpose_windows,
    conv_weight_grad,
    conv_windows,
    is_depthwise,
    window_columns,
)
from .linear import (
    linear_backward,
    linear_forward,
)
from .loss import (
    bce_with_logits_forward,
    mse_forward,
    sigmoid_focal_forward,
    softmax,
    softmax_cross_entropy_forward,
)
from .norm import (
    BatchNormCtx,
    NormCtx,
    batch_norm_backward,
    batch_norm_forward,
    centre_rows,
    channel_moments,
    channel_sums,
    grad_sums_from_rows,
    group_norm_forward,
    input_grad_from_rows,
    layer_norm_forward,
    norm_backward,
    norm_grad_sums,
    norm_input_grad,
    normalize_from_rows,
    normalize_rows,
    squared_deviations,
)
from .pool import (
    AvgPoolCtx,
    MaxPoolCtx,
    adaptive_avg_pool_backward,
    adaptive_avg_pool_forward,
    avg_pool2d_backward,
    avg_pool2d_forward,
    global_avg_pool_backward,
    global_avg_pool_forward,
    max_pool2d_backward,
    max_pool2d_forward,
    pool_windows,
)
from .primitives import (
    add,
    add_relu,
    bias_relu,
    column_sums,
    masked,
    matmul,
    pad_hw,
    relu_column_sums,
    relu_grad,
    sum_axis1,
    take_rows,
    window_max,
)
from .upsample import (
    upsample_bilinear_backward,
    upsample_bilinear_forward,
    upsample_nearest_backward,
    upsample_nearest_forward,
)
from .windows import (
    Windows,
    gather_windows,
    pad_nhwc,
    scatter_windows,
)
