"""Equalizing through ReLU6 (QuantConfig.equalize_relu6): what it costs in float and gains in int8, measured on
a trained depthwise-separable ReLU6 network (MobileNetDigits with its ReLUs replaced by ReLU6, trained on the
digits training split; SQNR and accuracy on the test split, ONNX Runtime preset activations).

Turning ReLU6 into ReLU changes the float function where activations exceed 6; the gain comes from equalizing
the chains the clips would otherwise cut. This is the measurement behind equalize_relu6's default (on for
per-tensor weights, off for per-channel).

    python benchmarks/relu6_equalize.py
"""

from __future__ import annotations

import warnings

import _repo  # noqa: F401  (the repo root on sys.path, for tests.models)
import torch
from torch import nn

import fxquant
from fxquant.cli.demo_model import fit, load_digits_split
from fxquant.metrics import sqnr
from fxquant.ptq.layers import float_mode
from tests.models.mobilenet_digits import MobileNetDigits

WEIGHTS = {"W7 per-channel (ORT preset)": None, "W8 per-tensor": fxquant.QuantSpec(axis=None),
           "W6 per-tensor": fxquant.QuantSpec(num_bits=6, axis=None),
           "W4 per-tensor": fxquant.QuantSpec(num_bits=4, axis=None)}


class MobileNetDigitsReLU6(MobileNetDigits):
    def __init__(self) -> None:
        super().__init__()
        for i, m in enumerate(self.features):
            if isinstance(m, nn.ReLU):
                self.features[i] = nn.ReLU6()


def main() -> None:
    warnings.filterwarnings("ignore")
    x_train, y_train, x_test, y_test = load_digits_split()
    torch.manual_seed(0)
    model = fit(MobileNetDigitsReLU6(), x_train, y_train, 10, 0, 32, 5e-3)
    batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
    with torch.no_grad():
        ref = model(x_test)
    print(f"float accuracy {float((ref.argmax(1) == y_test).float().mean()):.4f}")
    print("| weights | equalize_relu6 | float change (test SQNR) | int accuracy | int SQNR |")
    print("|---|---|---|---|---|")
    for label, weight in WEIGHTS.items():
        for through in (False, True):
            config = fxquant.QuantConfig(weight=weight, equalize=True, equalize_relu6=through)
            prepared = fxquant.prepare(model, x_train[:32], backend="onnxruntime", config=config)
            with float_mode(prepared), torch.no_grad():
                change = sqnr(ref, prepared(x_test))
            fxquant.calibrate(prepared, batches, progress=False)
            with torch.no_grad():
                out = fxquant.convert(prepared)(x_test)
            acc = float((out.argmax(1) == y_test).float().mean())
            print(f"| {label} | {through} | {change:.1f} dB | {acc:.4f} | {sqnr(ref, out):.2f} dB |")


if __name__ == "__main__":
    main()
