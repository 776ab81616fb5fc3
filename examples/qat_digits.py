"""Quantization-aware training at W4A4 on scikit-learn's digits, exported as QDQ ONNX for ONNX Runtime.

    python examples/qat_digits.py --out digits_w4a4.onnx

Train the digits CNN in float, calibrate (PTQ), fine-tune 3 epochs with fake quantization and learned (LSQ)
ranges, save and resume a checkpoint half way, convert, export and check the accuracy in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import io
import warnings

import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.cli.demo_model import accuracy, load_digits_split, train_digits
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.qat import param_groups

CONFIG = QuantConfig(weight=QuantSpec(num_bits=4, axis=0, narrow_range=True, learn_amax=True),  # [-7, 7]/channel
                     activation=QuantSpec(num_bits=4, symmetric=False, calib_method="mse", learn_amax=True))


def epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> None:
    model.train()  # fake quantization with straight-through gradients; ranges learn
    perm = torch.randperm(len(y), generator=g)
    for i in range(0, len(perm), 32):
        idx = perm[i:i + 32]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_w4a4.onnx")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the README's figures: the thread count changes float sums, so the trained model
    x_train, y_train, x_test, y_test = data = load_digits_split(seed=0)
    model = train_digits(seed=args.seed, data=data)
    print(f"fp32: {accuracy(model, x_test, y_test):.2f}%")

    def fresh() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 4-bit ranges: nothing the user must act on here
            return fxquant.prepare_qat(model, x_test[:1], backend="onnxruntime", config=CONFIG)

    prepared = fresh()                                                    # BatchNorm folded; `model` untouched
    fxquant.calibrate(prepared, [x_train[i:i + 64] for i in range(0, 512, 64)], progress=False)
    print(f"W4A4 PTQ: {accuracy(fxquant.convert(prepared), x_test, y_test):.2f}%")
    opt = torch.optim.Adam(param_groups(prepared, range_lr=5e-5), lr=5e-4)  # after calibrate: ranges exist
    fxquant.check_optimizer(prepared, opt)
    g = torch.Generator().manual_seed(args.seed)
    epoch(prepared, opt, x_train, y_train, g)

    checkpoint = io.BytesIO()                                             # a checkpoint file, half way
    torch.save({"model": prepared.state_dict(), "optimizer": opt.state_dict()}, checkpoint)
    checkpoint.seek(0)
    state = torch.load(checkpoint)
    prepared = fresh()                                                    # e.g. a new process: no calibration
    prepared.load_state_dict(state["model"])                              # weights, learned ranges, step counts
    opt = torch.optim.Adam(param_groups(prepared, range_lr=5e-5), lr=5e-4)
    opt.load_state_dict(state["optimizer"])
    for _ in range(2):
        epoch(prepared, opt, x_train, y_train, g)

    qmodel = fxquant.convert(prepared)                                    # frozen Q/DQ with the learned ranges
    print(f"W4A4 QAT: {accuracy(qmodel, x_test, y_test):.2f}%")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4-bit activations: ORT flips a few codes (README), judged on accuracy
        result = fxquant.export_onnx(qmodel, x_test[:32], args.out)
    session = ort_session(result.path, level="all")
    print(f"wrote {result.path}; ONNX Runtime: {accuracy(lambda x: run_ort(session, (x,))[0], x_test, y_test):.2f}%")


if __name__ == "__main__":
    main()
