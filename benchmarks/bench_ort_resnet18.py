"""ONNX Runtime CPU benchmark on torchvision resnet18: fp32 vs ORT's quantize_static vs fxquant's onnxruntime preset.

Measures, in one run and side by side:

1. fp32: the model exported with ``torch.onnx.export(..., dynamo=True, opset_version=18)``.
2. quantize_static: ORT's own ``onnxruntime.quantization.quantize_static`` on that fp32 ONNX (after
   ``quant_pre_process``): QDQ format, uint8 activations, int8 per-channel weights, ``reduce_range=True``
   (7-bit weights, ORT's recommendation on x86 AVX2 without VNNI), MinMax calibration.
3. fxquant: ``fxquant.prepare(model, x, backend="onnxruntime")`` -> ``calibrate`` -> ``convert`` -> ``export_onnx``
   (7-bit weights by default as well).

Both int8 models are calibrated on the same batches. There is no image data offline, so the model has random
weights (``torch.manual_seed(0)``, randomized BatchNorm statistics) and calibration/evaluation inputs are
``torch.randn``: the accuracy numbers are only a sanity check of agreement with fp32, not ImageNet accuracy.

For each model ORT's optimized graph (ORT_ENABLE_ALL) is saved and its nodes counted: float
Conv/Gemm/MatMul/FusedConv/FusedGemm/FusedMatMul left vs quantized QLinearConv/QGemm/QLinearMatMul/... Latency is
measured with ``intra_op_num_threads=--threads``, interleaving the models run by run (rotating the order) so
machine noise hits all of them alike.

Run::

    python benchmarks/bench_ort_resnet18.py [--runs 50] [--batch 1] [--threads 2] [--out results.json]

(``--out`` defaults to benchmarks/results/ort_resnet18.json; the ONNX models and ORT's optimized graphs go to
``--model-dir``, by default benchmarks/results/ort_resnet18_models/, which git ignores as *.onnx.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from results_meta import cpu_isa, cpu_name

import fxquant
from fxquant.cli.torchvision_models import random_torchvision
from fxquant.lower.onnx_export import export_float_onnx

FLOAT_OPS = frozenset({"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"})
QUANT_OPS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                       "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
MODELS = ("fp32", "quantize_static", "fxquant")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ort_resnet18.json")


@dataclass
class ModelResult:
    """What one ONNX model turned into in ORT and how fast it ran."""

    name: str
    path: str
    optimized_path: str
    float_ops: dict[str, int]
    quantized_ops: dict[str, int]
    op_histogram: dict[str, int]
    times_ms: list[float] = field(default_factory=list, repr=False)
    median_ms: float = 0.0
    mean_ms: float = 0.0
    stdev_ms: float = 0.0
    min_ms: float = 0.0
    speedup_vs_fp32: float = 0.0
    top1_agreement: float | None = None
    sqnr_db: float | None = None
    logit_error_rms: float | None = None


# ---- model and data -------------------------------------------------------------------------------------
def build_model() -> torch.nn.Module:
    """torchvision resnet18 with random weights and randomized BatchNorm statistics, in eval mode."""
    return random_torchvision("resnet18")


def random_batches(count: int, batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(count)]


@contextlib.contextmanager
def quiet() -> Any:
    """Silence warnings, stdout and stderr (the dynamo exporter and ORT's quantization tools are chatty)."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


# ---- the three models -----------------------------------------------------------------------------------
def export_fp32(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """fp32 ONNX through the same dynamo export path fxquant uses (dynamic batch dimension)."""
    with quiet():
        export_float_onnx(model, x, path)


class Reader(CalibrationDataReader):
    """Feeds the calibration batches to ORT's calibrator."""

    def __init__(self, input_name: str, batches: list[torch.Tensor]) -> None:
        self.input_name = input_name
        self.batches = batches
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.input_name: self.batches[self.index - 1].numpy()}

    def rewind(self) -> None:
        self.index = 0


def ort_quantize_static(fp32_path: str, path: str, batches: list[torch.Tensor], workdir: str,
                        reduce_range: bool = True) -> bool:
    """ORT's quantize_static (QDQ, u8 activations, s8 per-channel weights: 7-bit with ``reduce_range``, the
    setting CPUs without VNNI need); returns whether quant_pre_process ran (ORT recommends it: shape inference and
    Conv+BatchNorm folding)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = fp32_path
    pre_path = os.path.join(workdir, "fp32_preprocessed.onnx")
    preprocessed = False
    try:
        with quiet():
            quant_pre_process(fp32_path, pre_path)
        source, preprocessed = pre_path, True
    except Exception as exc:  # pragma: no cover - depends on the ORT version
        print(f"quant_pre_process failed ({type(exc).__name__}: {exc}); quantizing the raw fp32 model",
              file=sys.stderr)
    input_name = onnx.load(source, load_external_data=False).graph.input[0].name
    with quiet():
        quantize_static(source, path, Reader(input_name, batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range, calibrate_method=CalibrationMethod.MinMax)
    return preprocessed


def fxquant_export(model: torch.nn.Module, x: torch.Tensor, batches: list[torch.Tensor], path: str) -> float | None:
    """fxquant's onnxruntime preset; returns export_onnx's ORT-vs-fake-quant SQNR (dB)."""
    with quiet():
        prepared = fxquant.prepare(copy.deepcopy(model), x, backend="onnxruntime")
        fxquant.calibrate(prepared, batches, progress=False)
        qmodel = fxquant.convert(prepared)
        result = fxquant.export_onnx(qmodel, x, path)
    return result.ort_sqnr_db


# ---- ORT ------------------------------------------------------------------------------------------------
def session(path: str, threads: int, optimized_path: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def inspect_optimized(name: str, path: str, threads: int) -> ModelResult:
    """Build a session that saves ORT's optimized graph, then count the ops left in it."""
    optimized_path = path.replace(".onnx", ".ort_optimized.onnx")
    session(path, threads, optimized_path)
    ops = Counter(n.op_type for n in onnx.load(optimized_path, load_external_data=False).graph.node)
    return ModelResult(name=name, path=path, optimized_path=optimized_path,
                       float_ops={k: v for k, v in sorted(ops.items()) if k in FLOAT_OPS},
                       quantized_ops={k: v for k, v in sorted(ops.items()) if k in QUANT_OPS},
                       op_histogram=dict(sorted(ops.items())))


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def time_interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int,
                     warmup: int) -> dict[str, list[float]]:
    """Latency (ms) of each session, one run of each in turn with the order rotated every round."""
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            run(sessions[name], x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            run(sessions[name], x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return fxquant.sqnr(torch.from_numpy(reference), torch.from_numpy(test))


# ---- report ---------------------------------------------------------------------------------------------
def _count(ops: dict[str, int]) -> str:
    total = sum(ops.values())
    return f"{total} ({', '.join(f'{v} {k}' for k, v in ops.items())})" if total else "0"


def markdown(results: dict[str, ModelResult], ratio: float, args: argparse.Namespace) -> str:
    labels = {"fp32": "fp32 (dynamo export)",
              "quantize_static": "ORT `quantize_static` (QDQ, u8/s8 per-channel, reduce_range)",
              "fxquant": "fxquant `backend=\"onnxruntime\"`"}
    lines = ["| model | float Conv/Gemm/MatMul left | quantized ops | median latency ms | speedup vs fp32 |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {labels[name]} | {_count(r.float_ops)} | {_count(r.quantized_ops)} | "
                     f"{r.median_ms:.2f} | {r.speedup_vs_fp32:.2f}x |")
    lines += ["", f"fxquant vs quantize_static: {ratio:.2f}x (quantize_static median / fxquant median; "
              f">= 1.0 means fxquant is at least as fast)", "",
              f"resnet18, random weights, batch {args.batch}, ONNX Runtime {ort.__version__} CPU ({cpu_name()}, "
              f"{cpu_isa()}), ORT_ENABLE_ALL, {args.threads} intra-op threads, median of {args.runs} interleaved "
              f"runs. Both int8 models use 7-bit weights (reduce_range / the preset's default: the setting ORT "
              f"recommends on AVX2 without VNNI) and MinMax calibration on the same {args.calib_batches} x "
              f"{args.calib_batch_size} random (torch.randn) images: no real image data offline."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per model first")
    parser.add_argument("--batch", type=int, default=1, help="batch size for the latency measurement")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra_op_num_threads")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--calib-batch-size", type=int, default=8, help="images per calibration batch")
    parser.add_argument("--eval-inputs", type=int, default=16, help="random images for the agreement check")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--model-dir", default=None,
                        help="where the ONNX models and ORT's optimized graphs go (default: next to --out)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = _load()
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    model_dir = args.model_dir or os.path.join(out_dir, "ort_resnet18_models")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(model_dir, exist_ok=True)
    paths = {name: os.path.join(model_dir, f"resnet18_{name}.onnx") for name in MODELS}

    model = build_model()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    calib = random_batches(args.calib_batches, args.calib_batch_size, seed=2)

    t0 = time.perf_counter()
    export_fp32(model, x, paths["fp32"])
    print(f"[1/3] fp32 exported ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    t0 = time.perf_counter()
    preprocessed = ort_quantize_static(paths["fp32"], paths["quantize_static"], calib, model_dir)
    print(f"[2/3] quantize_static done, quant_pre_process={'ran' if preprocessed else 'failed'} "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    t0 = time.perf_counter()
    fx_sqnr = fxquant_export(model, x, calib, paths["fxquant"])
    print(f"[3/3] fxquant exported, ORT vs fake-quant SQNR {fx_sqnr:.1f} dB ({time.perf_counter() - t0:.1f}s)",
          file=sys.stderr)

    results = {name: inspect_optimized(name, paths[name], args.threads) for name in MODELS}
    sessions = {name: session(paths[name], args.threads) for name in MODELS}

    # agreement with the fp32 ONNX model (informational: random weights and random inputs)
    evals = random_batches(args.eval_inputs, 1, seed=3)
    logits = {name: np.concatenate([run(sess, e.numpy()) for e in evals]) for name, sess in sessions.items()}
    for name in MODELS[1:]:
        results[name].top1_agreement = float(np.mean(logits[name].argmax(1) == logits["fp32"].argmax(1)))
        results[name].sqnr_db = sqnr_db(logits["fp32"], logits[name])
        results[name].logit_error_rms = float(np.sqrt(np.mean((logits[name] - logits["fp32"]) ** 2)))
    top2 = np.sort(logits["fp32"], axis=1)[:, -2:]
    margin = float(np.median(top2[:, 1] - top2[:, 0]))

    print(f"timing: {args.warmup} warmup + {args.runs} interleaved runs per model ...", file=sys.stderr)
    times = time_interleaved(sessions, x.numpy(), args.runs, args.warmup)
    for name, r in results.items():
        r.times_ms = times[name]
        r.median_ms = statistics.median(times[name])
        r.mean_ms = statistics.fmean(times[name])
        r.stdev_ms = statistics.stdev(times[name]) if len(times[name]) > 1 else 0.0
        r.min_ms = min(times[name])
    for r in results.values():
        r.speedup_vs_fp32 = results["fp32"].median_ms / r.median_ms
    ratio = results["quantize_static"].median_ms / results["fxquant"].median_ms
    ratio_min = results["quantize_static"].min_ms / results["fxquant"].min_ms
    ratio_paired = statistics.median(q / f for q, f in zip(times["quantize_static"], times["fxquant"], strict=True))

    print(markdown(results, ratio, args))
    print()
    for name in MODELS:
        r = results[name]
        extra = "" if r.sqnr_db is None else (f"; vs fp32 on {args.eval_inputs} random inputs: top-1 agreement "
                                              f"{r.top1_agreement:.0%}, logits SQNR {r.sqnr_db:.1f} dB, "
                                              f"logit error RMS {r.logit_error_rms:.3f}")
        print(f"- {name}: median {r.median_ms:.2f} ms, mean {r.mean_ms:.2f} ms (stdev {r.stdev_ms:.2f}), "
              f"min {r.min_ms:.2f} ms{extra}")
    print(f"- fxquant vs quantize_static: {ratio_paired:.2f}x as the median of the per-round ratios (the runs of a "
          f"round are close together in time, so this is the least sensitive to load from other processes), "
          f"{ratio_min:.2f}x on the fastest run of each")
    same = results["fxquant"].op_histogram == results["quantize_static"].op_histogram
    print(f"- ORT-optimized graphs of fxquant and quantize_static {'have the same' if same else 'DIFFER in'} op "
          f"types and counts" + ("" if same else f": fxquant {results['fxquant'].op_histogram} vs quantize_static "
                                                 f"{results['quantize_static'].op_histogram}"))
    load = (load_start, _load())
    if max(load_start, load[1] - args.threads) >= 1.0:  # this process itself keeps `threads` cores busy
        print(f"- warning: 1-minute load average {load[0]:.1f} before / {load[1]:.1f} after on {os.cpu_count()} "
              f"cores: other processes competed for the CPU, so the latencies are noisy; rerun on an idle machine "
              f"or with more --runs")
    print(f"- fxquant export: ORT (ORT_ENABLE_ALL) vs fake-quant model SQNR {fx_sqnr:.1f} dB")
    print(f"- accuracy is informational only: with random weights the fp32 logits are nearly tied (median top-1 vs "
          f"top-2 margin {margin:.3f}), so top-1 agreement mostly measures which side of a tie the int8 noise falls")

    report = {
        "benchmark": "resnet18 (random weights, randomized BatchNorm stats), ONNX Runtime CPU",
        "command": " ".join(["python", "benchmarks/bench_ort_resnet18.py", *(argv if argv is not None
                                                                             else sys.argv[1:])]),
        "config": {**vars(args), "quant_pre_process": preprocessed,
                   "weights": "7-bit int8 (quantize_static reduce_range=True; fxquant onnxruntime preset default)",
                   "calibration": "MinMax on torch.randn images (no real image data offline)"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "onnxruntime": ort.__version__,
                        "onnx": onnx.__version__, "fxquant": fxquant.__version__, "cpu": cpu_name(),
                        "isa": cpu_isa(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "models": {name: asdict(r) for name, r in results.items()},
        "fxquant_export_ort_sqnr_db": fx_sqnr,
        "fxquant_vs_quantize_static": ratio,
        "fxquant_vs_quantize_static_paired": ratio_paired,
        "fxquant_vs_quantize_static_min": ratio_min,
        "same_optimized_op_histogram": same,
        "load_average_1min_before_after": load,
        "fp32_top1_top2_margin_median": margin,
        "markdown": markdown(results, ratio, args),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}; models and ORT-optimized graphs in {model_dir}", file=sys.stderr)
    return report


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


if __name__ == "__main__":
    main()
