"""The kernels floor: fast computations behind the portable ops, chosen in one place.

- :mod:`~anycnn.kernels.dispatch` — the one dispatch point: portable ops of
  :mod:`anycnn.nn.functional` offer each call to the kernels registered under their name, which
  return a result or decline.
- :mod:`~anycnn.kernels.threads` — the library's thread pool, batch-parallel regions
  (:func:`~anycnn.kernels.threads.map_batch`) and the one-thread BLAS they run under.
- :mod:`~anycnn.kernels.fastpath` — NumPy kernels (``out=`` calls, cache-sized chunks, shards).
- :mod:`~anycnn.kernels.native` and :mod:`~anycnn.kernels.native_norm` — compiled (Halide)
  convolution and BatchNorm kernels for NumPy arrays.
- :mod:`~anycnn.kernels.torch_ops` — torch's own convolution, pooling and BatchNorm operators
  for torch tensors (oneDNN on a CPU, cuDNN on CUDA).
- :mod:`~anycnn.kernels.special` — the array library's own special functions (``erf``).

This package imports only the backend shim below it, never :mod:`anycnn.nn` above it.
``ANYCNN_FASTPATH=0`` switches every kernel off (``ANYCNN_NATIVE=0`` only the compiled ones).
"""
