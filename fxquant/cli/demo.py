"""The demo: train the digits CNN, quantize it for both backends, compare fp32 and int8 in torch and ORT."""

from __future__ import annotations

import os
import statistics
import time

import torch

import fxquant
from fxquant.cli.demo_model import accuracy, load_digits_split, train_digits
from fxquant.lower.onnx_export import export_float_onnx, ort_session, run_ort
from fxquant.lower.ort.latency import interleaved_session_ms


def run_demo(out_dir: str = "fxquant_out", seed: int = 0, calib_batches: int = 8) -> dict:
    """Run the demo, print its table, and return the figures."""
    torch.manual_seed(seed)
    data = load_digits_split(seed)
    x_train, _, x_test, y_test = data
    start = time.perf_counter()
    model = train_digits(seed=seed, data=data)
    print(f"fxquant demo: DigitsNet on scikit-learn's digits ({len(x_train)} train / {len(x_test)} test images), "
          f"trained in {time.perf_counter() - start:.1f} s")
    fp32_torch = accuracy(model, x_test, y_test)
    one = x_test[:1]
    fp32_path = export_float_onnx(model, one, os.path.join(out_dir, "digits_fp32.onnx"))
    fp32_session = ort_session(fp32_path, threads=1)
    fp32_ort = accuracy(lambda x: run_ort(fp32_session, (x,))[0], x_test, y_test)
    sessions = {"fp32": fp32_session}
    batches = [x_train[i * 64:(i + 1) * 64] for i in range(calib_batches)]
    rows = {}
    models = {backend: fxquant.quantize(model, one, batches, backend=backend, progress=False)
              for backend in ("tensorrt", "onnxruntime")}
    tuned = fxquant.tune(models["onnxruntime"], one)  # timed layer by layer: float where int8 is slower
    models["onnxruntime+tune"] = tuned.model
    for backend, qmodel in models.items():
        path = os.path.join(out_dir, f"digits_{backend.replace('+', '_')}.onnx")
        result = fxquant.export_onnx(qmodel, x_test[:16], path)
        # The onnxruntime preset runs fused, as deployed; the tensorrt preset is meant for TensorRT, so ORT
        # runs its graph unfused (reference semantics) and its latency here says nothing about TensorRT.
        session = sessions[backend] = ort_session(result.path, threads=1,
                                                  level="basic" if backend == "tensorrt" else "all")
        rows[backend] = {
            "int8_torch": accuracy(qmodel, x_test, y_test),
            "int8_ort": accuracy(lambda x, s=session: run_ort(s, (x,))[0], x_test, y_test),
            "agreement_db": result.ort_sqnr_db,
            "path": result.path,
        }
    times = interleaved_session_ms(list(sessions.values()), [one.numpy()], runs=300, warmup=20)
    latency = dict(zip(sessions, (statistics.median(t) for t in times), strict=True))
    fp32_ms = latency["fp32"]
    for backend, row in rows.items():
        row["int8_ms"] = latency[backend]
    print(f"\n{tuned.summary()}")
    print(f"\n{'backend':<16} {'fp32 torch':>10} {'int8 torch':>10} {'fp32 ORT':>9} {'int8 ORT':>9} "
          f"{'ORT fp32 ms':>11} {'ORT int8 ms':>11} {'ORT~torch dB':>12}  ONNX")
    for backend, r in rows.items():
        print(f"{backend:<16} {fp32_torch:>10.2f} {r['int8_torch']:>10.2f} {fp32_ort:>9.2f} {r['int8_ort']:>9.2f} "
              f"{fp32_ms:>11.3f} {r['int8_ms']:>11.3f} {r['agreement_db']:>12.1f}  {r['path']}")
    print(f"\nfp32 ONNX: {fp32_path}")
    print("Accuracy in %, latency at batch 1, one thread (median of 300 runs, the models timed in turn). The "
          "onnxruntime row runs ORT's fused int8 kernels; the "
          "tensorrt row is for TensorRT and runs unfused in ORT, as a check of its meaning only; the "
          "onnxruntime+tune row is the onnxruntime model after fxquant.tune (float where int8 is slower).")
    return {"fp32_torch": fp32_torch, "fp32_ort": fp32_ort, "fp32_ms": fp32_ms, "backends": rows,
            "tune": tuned}
