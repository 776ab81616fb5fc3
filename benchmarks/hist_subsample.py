"""Does binning a subsample change calibration? Each preset's histogram method with its default
``QuantSpec.hist_samples`` (2^18 elements per tensor and batch) against ``hist_samples=None`` (every element), on
real pretrained models: the activation ranges each gives (relative difference per quantizer), and the fake-quant
model's SQNR and top-1 agreement with fp32 on 64 held-out crops (CNNs) or mean cosine on sentences (MiniLM).

    python benchmarks/hist_subsample.py        # writes benchmarks/results/hist_subsample.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxquant
from benchmarks.cnn_pretrained import MODELS, photos, quiet, random_crops
from fxquant.backends import get_backend
from fxquant.quantizer import quantizers_of

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hist_subsample.json")


def calibrated(model, x, calib, backend: str, samples: int | None):
    spec = get_backend(backend).activation.with_(hist_samples=samples)
    with quiet():
        prepared = fxquant.prepare(model, x, backend=backend, config=fxquant.QuantConfig(activation=spec))
        start = time.perf_counter()
        fxquant.calibrate(prepared, calib, progress=False)
    return prepared, time.perf_counter() - start


def ranges(prepared) -> dict[str, tuple[float, float]]:
    out = {}
    for name, q in quantizers_of(prepared).items():
        if q.spec.calib_method in ("percentile", "entropy", "mse") and q.mode != "disabled" and q.scale is not None:
            scale = float(q.scale.reshape(-1)[0])
            zp = float(q.zero_point.reshape(-1)[0]) if getattr(q, "zero_point", None) is not None else 0.0
            out[name] = ((q.spec.qmin - zp) * scale, (q.spec.qmax - zp) * scale)
    return out


def compare(a: dict, b: dict) -> dict:
    diffs = sorted(max(abs(x - y) for x, y in zip(a[k], b[k], strict=True)) / max(abs(b[k][1] - b[k][0]), 1e-12)
                   for k in b)
    return {"quantizers": len(diffs), "identical": sum(d == 0 for d in diffs),
            "median_rel_diff": diffs[len(diffs) // 2], "max_rel_diff": diffs[-1],
            "over_1pct": sum(d > 0.01 for d in diffs)}


def cnn(name: str, backend: str) -> dict:
    model = MODELS[name]()
    images = photos()
    calib = list(random_crops(images, 64, seed=1).split(16))
    test = random_crops(images, 64, seed=2)
    with torch.no_grad():
        ref = model(test)
    row = {}
    for label, samples in (("subsample", fxquant.QuantSpec.hist_samples), ("all", None)):
        prepared, seconds = calibrated(model, calib[0][:1], calib, backend, samples)
        with torch.no_grad():
            out = fxquant.convert(prepared)(test)
        row[label] = {"calibrate_s": seconds, "sqnr_db": fxquant.sqnr(ref, out),
                      "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                      "ranges": ranges(prepared)}
    row["ranges"] = compare(row["subsample"].pop("ranges"), row["all"].pop("ranges"))
    return row


def main() -> None:
    torch.set_num_threads(2)
    bits = fxquant.QuantSpec.hist_samples.bit_length() - 1
    results = {"note": f"2-core machine; ranges compare hist_samples=2^{bits} (the default) against None (every "
                       "element)", "hist_samples": fxquant.QuantSpec.hist_samples}
    for name in ("efficientnet_lite0", "mobilenet_v2"):
        for backend in ("onnxruntime", "tensorrt"):
            results[f"{name}/{backend}"] = cnn(name, backend)
            print(name, backend, json.dumps(results[f"{name}/{backend}"]), flush=True)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
