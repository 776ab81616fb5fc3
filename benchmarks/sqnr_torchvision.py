"""int8 fidelity on torchvision models: SQNR of the fake-quant model against fp32, and of ONNX Runtime against
the fake-quant model, for both backends.

Models have random weights with randomized BatchNorm statistics (no pretrained weights can be downloaded
here), so BN folding matters; inputs and calibration batches are Gaussian noise.

    python benchmarks/sqnr_torchvision.py [--models resnet18 mobilenet_v2] [--calib-batches 4]

Prints the table and writes its rows to benchmarks/results/sqnr_torchvision.json (docs/benchmarks.md is rendered
from it by benchmarks/make_docs.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from results_meta import write_results

import fxquant
from fxquant.cli.torchvision_models import random_torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--calib-batches", type=int, default=4)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 224, 224, generator=gen) for _ in range(args.calib_batches)]
    x = torch.randn(4, 3, 224, 224, generator=gen)
    print("| model | backend | int8 vs fp32 (dB) | ORT vs fake-quant (dB) | Q / DQ nodes | prepare+calibrate+convert s "
          "| export s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = random_torchvision(name)
            for backend in ("tensorrt", "onnxruntime"):
                start = time.perf_counter()
                qmodel = fxquant.quantize(model, x, batches, backend=backend, progress=False)
                compile_s = time.perf_counter() - start
                with torch.no_grad():
                    fidelity = fxquant.sqnr(model(x), qmodel(x))
                start = time.perf_counter()
                result = fxquant.export_onnx(qmodel, x, Path(tmp) / f"{name}_{backend}.onnx")
                export_s = time.perf_counter() - start
                ops = result.op_counts
                print(f"| {name} | {backend} | {fidelity:.1f} | {result.ort_sqnr_db:.1f} | "
                      f"{ops['QuantizeLinear']} / {ops['DequantizeLinear']} | {compile_s:.1f} | {export_s:.1f} |")
                rows.append({"model": name, "backend": backend, "int8_vs_fp32_db": fidelity,
                             "ort_vs_fakequant_db": result.ort_sqnr_db, "quantize_linear": ops["QuantizeLinear"],
                             "dequantize_linear": ops["DequantizeLinear"], "compile_s": compile_s,
                             "export_s": export_s})
    settings = {"models": args.models, "calib_batches": args.calib_batches, "batch": 4, "input": [3, 224, 224]}
    print(f"wrote {write_results('sqnr_torchvision', rows, settings)}")


if __name__ == "__main__":
    main()
