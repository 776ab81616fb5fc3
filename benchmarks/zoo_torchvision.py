"""The torchvision zoo through prepare -> calibrate -> convert -> export_onnx with both backends.

Per model and backend: int8 (fake-quant) vs fp32 SQNR, ONNX Runtime vs fake-quant SQNR (what export_onnx
verifies; the onnxruntime preset runs with every ORT fusion on, the tensorrt preset at ORT's basic level),
Q/DQ node counts, ops the prepare report leaves float, float compute ops left in ORT's optimized graph
(onnxruntime preset), and wall times. Random weights with randomized BatchNorm (tests.models.zoo).

    python benchmarks/zoo_torchvision.py                 # every model (slow: about an hour on 2 cores)
    python benchmarks/zoo_torchvision.py --models resnet18,vit_b_16 --backends onnxruntime

Results are merged into benchmarks/results/zoo.json (one entry per model and backend) and the whole table
is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections import Counter

import _repo  # noqa: F401  (the repo root on sys.path, for tests.models)
import onnx
import torch
from doc_tables import zoo as markdown

import fxquant
from fxquant.lower.onnx_export import ort_session
from tests.models.zoo import ZOO, zoo_model

RESULTS = os.path.join(os.path.dirname(__file__), "results", "zoo.json")
QUANTIZED_ORT_OPS = ("QLinear", "QGemm", "QuantizeLinear", "DequantizeLinear", "DynamicQuantize", "MatMulInteger",
                     "NhwcMaxPool")  # ORT's NhwcMaxPool is its 8-bit max pool
DATA_MOVEMENT = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Gather", "Slice", "Concat",
                 "Split", "Identity", "Expand", "Constant", "ConstantOfShape", "Cast", "GatherND", "GatherElements"}


def float_ops_in_ort(path: str) -> Counter:
    """Compute ops (not Q/DQ, not int8 kernels, not data movement) in ORT's fully optimized graph."""
    optimized = path.replace(".onnx", ".ort_optimized.onnx")
    ort_session(path, optimized_path=optimized, level="all")
    graph = onnx.load(optimized).graph
    return Counter(n.op_type for n in graph.node
                   if not n.op_type.startswith(QUANTIZED_ORT_OPS) and n.op_type not in DATA_MOVEMENT)


def run(name: str, backend: str, workdir: str) -> dict:
    model, size = zoo_model(name)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(2, 3, size, size, generator=gen)
    x = torch.randn(1, 3, size, size, generator=gen)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, x, backend=backend)
    t1 = time.perf_counter()
    fxquant.calibrate(prepared, [calib], progress=False)
    qmodel = fxquant.convert(prepared)
    t2 = time.perf_counter()
    with torch.no_grad():
        int8_db = fxquant.sqnr(model(x), qmodel(x))
    path = os.path.join(workdir, f"{name}_{backend}.onnx")
    result = fxquant.export_onnx(qmodel, x, path, dynamic_batch=False)
    t3 = time.perf_counter()
    report = fxquant.report_of(prepared)
    counts = result.op_counts
    row = {
        "input": [1, 3, size, size], "nodes": len(prepared.graph.nodes),
        "int8_vs_fp32_db": round(int8_db, 2), "ort_vs_fakequant_db": round(result.ort_sqnr_db, 2),
        "quantize_linear": counts["QuantizeLinear"], "dequantize_linear": counts["DequantizeLinear"],
        "quantized_ops": len(report.quantized), "report_float_ops": dict(Counter(e.kind for e in report.float_ops)),
        "prepare_s": round(t1 - t0, 2), "calibrate_convert_s": round(t2 - t1, 2), "export_s": round(t3 - t2, 2),
    }
    if backend == "onnxruntime":
        row["ort_float_ops"] = dict(float_ops_in_ort(path))
    return row


def _load() -> dict:
    if not os.path.exists(RESULTS):
        return {}
    with open(RESULTS) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--backends", default="tensorrt,onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rerun", action="store_true", help="measure models already in the results file again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            for backend in args.backends.split(","):
                size = zoo_model(name)[1]
                done = _load().get(name, {}).get(backend)
                if not args.rerun and done is not None and done["input"][-1] == size:
                    continue  # measured already at this input size (--rerun measures again)
                try:
                    row = run(name, backend, workdir)
                except Exception as exc:  # one failing model must not hide the others' figures
                    print(f"{name} {backend}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                print(f"{name} {backend}: {json.dumps(row)}", flush=True)
                results = _load()  # merge: another run may have written meanwhile
                results.setdefault(name, {})[backend] = row
                results = {n: results[n] for n in [*ZOO, *results] if n in results}  # ZOO order, as documented
                os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
                with open(RESULTS, "w") as f:
                    json.dump(results, f, indent=1)
    results = _load()
    print(markdown(results))


if __name__ == "__main__":
    main()
