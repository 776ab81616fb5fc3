"""Mixed precision on real data: the digits CNN at W4A4 (4-bit per-channel weights, 4-bit affine activations,
onnxruntime placement) keeps the fewest most-sensitive layers float that bring test accuracy within 0.5 points
of fp32, then exports the result to QDQ ONNX.

    python examples/mixed_precision_digits.py
"""

from __future__ import annotations

import torch

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.cli.demo_model import accuracy, load_digits_split, train_digits


def main() -> None:
    torch.manual_seed(0)
    x_train, _, x_test, y_test = data = load_digits_split(seed=0)
    model = train_digits(seed=0, data=data)
    fp32 = accuracy(model, x_test, y_test)
    config = QuantConfig(weight=QuantSpec(4, axis=0, narrow_range=True),
                         activation=QuantSpec(4, symmetric=False, calib_method="mse"))
    batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
    result = fxquant.mixed_precision(model, x_test[:1], batches, backend="onnxruntime", config=config,
                                     metric=lambda m: accuracy(m, x_test, y_test), target=fp32 - 0.5)
    print(f"fp32 accuracy {fp32:.2f}%")
    print(result.summary())
    print("search (float layers -> accuracy):", ", ".join(f"{n} -> {v:.2f}" for n, v in result.trials))
    exported = fxquant.export_onnx(result.model, x_test[:32], "fxquant_out/digits_w4a4_mixed.onnx")
    print(f"ONNX: {exported.path} (ONNX Runtime vs fake-quant {exported.ort_sqnr_db:.1f} dB)")


if __name__ == "__main__":
    main()
