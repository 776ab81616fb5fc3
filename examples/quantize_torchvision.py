"""Targets a torchvision model for TensorRT or ONNX Runtime and export QDQ ONNX.

    python examples/quantize_torchvision.py --model resnet18 --backend tensorrt --out resnet18_trt.onnx

No pretrained weights can be downloaded offline, so the model has random weights and calibration uses random
images; with a real model, pass your own weights and a DataLoader of real images as ``batches``.
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import fxquant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    parser.add_argument("--backend", default="tensorrt", choices=sorted(fxquant.BACKENDS))
    parser.add_argument("--out", default="model_int8.onnx")
    parser.add_argument("--calib-batches", type=int, default=4)
    args = parser.parse_args()

    model = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(1, 3, 224, 224)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(args.calib_batches)]

    prepared = fxquant.prepare(model, x, backend=args.backend)       # `model` itself is never modified
    print(fxquant.report_of(prepared).summary())                     # what is quantized, what stays float and why
    fxquant.calibrate(prepared, batches)                             # progress bar, no grad, eval mode
    qmodel = fxquant.convert(prepared)                               # fake-quant GraphModule, frozen scales
    with torch.no_grad():
        print(f"int8 vs fp32 SQNR: {fxquant.sqnr(model(x), qmodel(x)):.1f} dB")
    result = fxquant.export_onnx(qmodel, x, args.out)                # checked by onnx.checker, run in ORT
    print(f"wrote {result.path}: {dict(result.op_counts)}; ORT agrees with torch at {result.ort_sqnr_db:.1f} dB")


if __name__ == "__main__":
    main()
