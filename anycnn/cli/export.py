"""``anycnn export``: write a checkpoint's model as an ONNX file (:mod:`anycnn.io.onnx`), with
its preprocess record in the file's metadata for ``anycnn predict``."""

from __future__ import annotations

import argparse
import json

from .common import backend_option, positive_int, select_backend

HELP = ("write a checkpoint's model as an ONNX file (standard operators, NHWC input [batch, H, "
        "W, C], output logits [batch, K]; needs pip install 'anycnn[onnx]')")


def add_arguments(x: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn export``."""
    x.add_argument("checkpoint", help="a checkpoint file, or a run folder holding "
                   "checkpoint.safetensors")
    x.add_argument("output", metavar="MODEL.onnx", help="the ONNX file to write")
    x.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset version, 17 or newer (default: 17)")
    x.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"],
                   help="the graph input's layout (nhwc: as anycnn takes images, transposed "
                   "to NCHW inside the graph)")
    backend_option(x)


def run(args) -> int:
    """``anycnn export``."""
    from ..io.checkpoint import checkpoint_in, load_model
    from ..io.onnx import export_onnx, import_onnx
    from .predict import preprocess_of

    onnx = import_onnx()  # no onnx: say so before loading anything
    select_backend(args.backend)
    model, state = load_model(checkpoint_in(args.checkpoint))
    record, recorded = preprocess_of(state, model)
    metadata = {"preprocess": json.dumps(record)} if recorded else None  # for anycnn predict
    written = export_onnx(model, args.output, opset=args.opset, layout=args.layout,
                          metadata=metadata)
    opset = onnx.load(str(written)).opset_import[0].version
    spec = model.model_spec
    side, channels = spec["image_size"], spec["in_channels"]
    shape = (f"[batch, {side}, {side}, {channels}]" if args.layout == "nhwc" else
             f"[batch, {channels}, {side}, {side}]")
    print(f"wrote {written} ({spec['name']}, opset {opset}): input {shape} "
          f"{args.layout.upper()} {state.dtype}, output logits [batch, {spec['num_classes']}]")
    return 0
