"""PyTorch's side of ``anycnn bench --compare-torch``: one worker process, started by the bench
driver (:mod:`anycnn.cli.bench`) as ``python tools/bench_torch.py WORKER-JSON``.

``WORKER-JSON`` is the driver's worker config (``kind`` ``torch`` or ``torch-cl``, ``model``,
``batch``, ``dtype``, ``steps``, ``warmup``, ``threads``, ``gpu``, and ``infer_only`` for
``anycnn bench --infer``: inference alone, no training steps); the last line printed is the
result as JSON. The model is the anycnn preset converted by
:func:`anycnn.io.interop.torch_module`, or, for the torchvision architectures (``resnet18``,
``mobilenet_v2``, ...), torchvision's own model (imported with ``torch.library.register_fake``
stubbed: its compiled operators are not needed and do not load beside a CPU build of torch),
timed with the same loop as anycnn's worker.

This script is part of the repository, not of the anycnn wheel: it compares with another
framework, which the library itself never needs. It imports the anycnn of the checkout it lives
in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def torch_worker(cfg: dict, channels_last: bool) -> dict:
    """Time ``cfg``'s model as a PyTorch module (NCHW, or channels_last): training steps (SGD
    with momentum 0.9, cross-entropy) and inference, on the GPU when ``cfg["gpu"]`` and CUDA
    are there; the same keys as anycnn's worker reports."""
    import numpy as np
    import torch

    from anycnn.cli.bench import model_input_shape, rss_mib, time_steps
    from anycnn.io.interop import torch_module
    from anycnn.models import build_model
    from anycnn.models.backbone import Backbone

    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.get("gpu") else "cpu")
    dtype = getattr(torch, cfg["dtype"])
    size = model_input_shape(cfg["model"])
    model = build_model(cfg["model"])
    if isinstance(model, Backbone):
        net = getattr(import_torchvision().models, cfg["model"])(
            num_classes=model.model_spec["num_classes"])
    else:
        net = torch_module(model, size)
    net = net.to(device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    b = cfg["batch"]
    x = torch.tensor(rng.random((b, size[2], size[0], size[1]), dtype=np.float32),
                     dtype=dtype, device=device)
    y = torch.tensor(rng.integers(0, 10, b), device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            net(x)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = rss_mib("VmRSS")
    if cfg.get("infer_only"):  # anycnn bench --infer: eval-mode forwards alone
        train = []
        net.eval()
        inference = time_steps(infer, sync, cfg["warmup"], cfg["steps"])
    else:
        train = time_steps(step, sync, cfg["warmup"], cfg["steps"])
        net.eval()
        inference = time_steps(infer, sync, 1, cfg["steps"])
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    return {"train_ms": train, "infer_ms": inference, "base_mib": base,
            "peak_mib": rss_mib("VmHWM"), "backend": "torch", "device": str(device),
            "cudnn": cudnn}


def import_torchvision():
    """torchvision, imported with ``torch.library.register_fake`` stubbed for the duration."""
    import torch

    original = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        import torchvision
    finally:
        torch.library.register_fake = original
    return torchvision


def main(argv: list[str] | None = None) -> int:
    """Run the worker of ``argv[0]`` (a JSON config) and print its result as one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    if cfg.get("kind") not in ("torch", "torch-cl"):
        print(f"bench_torch: unknown worker kind {cfg.get('kind')!r} (torch or torch-cl)",
              file=sys.stderr)
        return 2
    result = torch_worker(cfg, channels_last=cfg["kind"] == "torch-cl")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's anycnn
    sys.exit(main())
