"""TensorRT check: build an INT8 engine from a tensorrt-preset QDQ ONNX and show what TensorRT made of it.

    python benchmarks/trt_check.py                      # resnet18 (random weights), quantized by fxquant
    python benchmarks/trt_check.py --onnx model.onnx    # an ONNX file exported with backend="tensorrt"

Prints each engine layer with its input/output precision (from TensorRT's engine inspector, detailed
verbosity), how many convolutions run in INT8, and which layers fuse a Conv with a residual Add. Needs an
NVIDIA GPU and the ``tensorrt`` Python package (``pip install tensorrt``); without them it says which is missing
and exits with code 0. ``--json`` saves the inspector's layer list.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile


def _missing() -> str | None:
    """Why this machine cannot build an engine, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to this process"
    return None


def export_resnet18(path: str, batch: int, calib_batches: int) -> str:
    """resnet18 (random weights, randomized BatchNorm) through fxquant's tensorrt preset to QDQ ONNX."""
    import torch

    import fxquant
    from fxquant.cli.torchvision_models import random_torchvision

    model = random_torchvision("resnet18")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(calib_batches)]
    qmodel = fxquant.quantize(model, batches[0][:1], batches, backend="tensorrt")
    # static batch: the inspector reports formats only for fixed shapes
    fxquant.export_onnx(qmodel, batches[0][:batch], path, dynamic_batch=False)
    return path


def build_engine(onnx_path: str, fp16: bool = True):
    """Parse the ONNX file and build a serialized engine with INT8 (and FP16 fallback) enabled."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)  # what stays float may run in FP16, as deployed
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    return engine


def engine_layers(engine) -> list[dict]:
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))["Layers"]


def precision(tensors: list) -> str:
    found = []
    for t in tensors:
        text = str(t.get("Format/Datatype", "")) if isinstance(t, dict) else str(t)
        low = text.lower()
        name = ("INT8" if "int8" in low else "FP16" if ("fp16" in low or "half" in low) else
                "FP32" if ("fp32" in low or "float" in low) else "?")
        if name not in found:
            found.append(name)
    return "/".join(found) or "-"


def onnx_nodes(layer: dict) -> list[str]:
    """The ONNX nodes a layer came from: TensorRT joins fused nodes' names with ' + ' and lists them in
    'Metadata' as '[ONNX Layer: name]'."""
    names = re.findall(r"\[ONNX Layer: ([^\]]+)\]", str(layer.get("Metadata", "")))
    return names or [n.strip() for n in str(layer.get("Name", "")).split(" + ")]


def summarize(layers: list[dict]) -> dict:
    rows, convs, int8_convs, conv_add = [], 0, 0, []
    for layer in layers:
        nodes = onnx_nodes(layer)
        kind = str(layer.get("LayerType", "?"))
        in_p, out_p = precision(layer.get("Inputs", [])), precision(layer.get("Outputs", []))
        ops = [n.rsplit("/", 1)[-1] for n in nodes]  # fxquant names ONNX nodes <module path>/<OpType>
        named = any("/" in n for n in nodes)
        if any(op.startswith("Conv") for op in ops) if named else kind.endswith("Convolution"):
            convs += 1
            int8_convs += in_p.startswith("INT8")
            if any(op.startswith("Add") for op in ops):
                conv_add.append(" + ".join(nodes))
        rows.append((str(layer.get("Name", "?")), kind, in_p, out_p))
    return {"rows": rows, "convs": convs, "int8_convs": int8_convs, "conv_add": conv_add}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", help="a tensorrt-preset QDQ ONNX file (default: quantize resnet18 first)")
    parser.add_argument("--batch", type=int, default=1, help="static batch size of the exported model (default: 1)")
    parser.add_argument("--calib-batches", type=int, default=4, help="random calibration batches for resnet18")
    parser.add_argument("--no-fp16", action="store_true", help="let layers that are not INT8 run in FP32 only")
    parser.add_argument("--json", help="save the engine inspector's layer list here")
    args = parser.parse_args(argv)

    why = _missing()
    if why is not None:
        print(f"TensorRT check skipped: {why}. Run this on a machine with an NVIDIA GPU and the tensorrt package.")
        return 0
    path = args.onnx or export_resnet18(os.path.join(tempfile.mkdtemp(), "resnet18_tensorrt.onnx"), args.batch,
                                        args.calib_batches)
    import tensorrt as trt

    engine = build_engine(path, fp16=not args.no_fp16)
    layers = engine_layers(engine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(layers, f, indent=1)
    s = summarize(layers)
    width = min(90, max(len(r[0]) for r in s["rows"]))
    print(f"TensorRT {trt.__version__}: {len(layers)} engine layers from {path}\n")
    print(f"{'layer (fused ONNX nodes)':<{width}}  {'type':<22} {'in':<10} out")
    for name, kind, in_p, out_p in s["rows"]:
        print(f"{name[:width]:<{width}}  {kind[:22]:<22} {in_p:<10} {out_p}")
    print(f"\nconvolutions running INT8: {s['int8_convs']} of {s['convs']}")
    print(f"layers fusing Conv with a residual Add: {len(s['conv_add'])}")
    for fused in s["conv_add"]:
        print(f"  {fused}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
