"""QAT on the digits CNN at W4A4: fxquant's prepare_qat against torch.ao's prepare_qat_fx, same model and schedule.

Per seed: train DigitsNet in float (seed s), PTQ-calibrate on 8 batches of 64 training images, then 3 epochs of
QAT with Adam (lr 5e-4, batch 32, the same shuffling for every flow; learned ranges at lr 5e-4 or 5e-5).
W4A4: 4-bit per-channel symmetric weights
([-7, 7]), 4-bit asymmetric per-tensor activations ([0, 15]). Test accuracy of the fake-quant model in torch
(fxquant: the converted GraphModule; torch.ao: the QAT model in eval mode, since its 4-bit kernels do not exist).

    python benchmarks/qat_digits.py --seeds 0 1 2 3 4 --out benchmarks/results/qat_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from functools import partial

import torch
from torch import nn

import fxquant
import fxquant.qat
from fxquant import QuantConfig, QuantSpec
from fxquant.cli.demo_model import accuracy, load_digits_split, run_epochs, train_digits

EPOCHS, LR, BATCH = 3, 5e-4, 32
WEIGHT = QuantSpec(num_bits=4, axis=0, narrow_range=True)
ACTIVATION = QuantSpec(num_bits=4, symmetric=False, calib_method="mse")


def fxquant_flows() -> dict[str, tuple[dict, float | None]]:
    """Flow name -> (prepare_qat keyword arguments, learning rate of the learned ranges or None)."""
    learn = QuantConfig(weight=WEIGHT.with_(learn_amax=True), activation=ACTIVATION.with_(learn_amax=True))
    fixed = QuantConfig(weight=WEIGHT, activation=ACTIVATION)
    return {
        "fxquant LSQ, ranges at lr/10": ({"config": learn}, LR / 10),
        "fxquant LSQ, ranges at lr": ({"config": learn}, LR),
        "fxquant fixed ranges": ({"config": fixed}, None),
        "fxquant EMA ranges": ({"config": fixed, "ranges": "ema"}, None),
    }


def train_epochs(model: nn.Module, data: tuple, seed: int, epochs: int = EPOCHS, range_lr: float | None = None,
                 check=None) -> None:
    """Adam at LR (learned ranges at ``range_lr``), batch BATCH, shuffled by ``seed``; leaves ``model`` in eval."""
    x_train, y_train = data[0], data[1]
    params = model.parameters() if range_lr is None else fxquant.qat.param_groups(model, range_lr)
    opt = torch.optim.Adam(params, lr=LR)
    if check is not None:
        check(model, opt)
    run_epochs(model, opt, x_train, y_train, epochs, seed, BATCH)


def run_fxquant(model: nn.Module, data: tuple, calib: list, seed: int, kwargs: dict,
                range_lr: float | None) -> tuple[float, float]:
    x_test, y_test = data[2], data[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_qat(model, x_test[:1], backend="onnxruntime", **kwargs)
    fxquant.calibrate(prepared, calib, progress=False)
    ptq = accuracy(fxquant.convert(prepared), x_test, y_test)
    train_epochs(prepared, data, seed, range_lr=range_lr, check=fxquant.check_optimizer)
    return ptq, accuracy(fxquant.convert(prepared), x_test, y_test)


def run_bn_in_training(model: nn.Module, data: tuple, calib: list, seed: int) -> tuple[float, float]:
    """BatchNorm left unfolded and in training mode during QAT (batch statistics, as when QAT keeps BN float),
    then folded for deployment: the trained weights go back into the float model, which is PTQ-calibrated."""
    x_test, y_test = data[2], data[3]
    fixed = fxquant_flows()["fxquant fixed ranges"][0]["config"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_qat(model, x_test[:1], backend="onnxruntime",
                                       config=QuantConfig(weight=fixed.weight, activation=fixed.activation,
                                                          fold_bn=False))
        fxquant.calibrate(prepared, calib, progress=False)
        train_epochs(prepared, data, seed)
        trained = copy.deepcopy(model)
        trained.load_state_dict({k: v for k, v in prepared.state_dict().items() if "quantizer" not in k})
        deployed = fxquant.prepare(trained, x_test[:1], backend="onnxruntime", config=fixed)
    fxquant.calibrate(deployed, calib, progress=False)
    return float("nan"), accuracy(fxquant.convert(deployed), x_test, y_test)


def run_torch_ao(model: nn.Module, data: tuple, calib: list, seed: int) -> tuple[float, float]:
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        disable_fake_quant,
        enable_fake_quant,
    )
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    x_test, y_test = data[2], data[3]
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-7, quant_max=7,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = prepare_qat_fx(copy.deepcopy(model).train(), mapping, (x_test[:1],))
    qat.eval()  # calibrate: observers see the data, BatchNorm keeps its running statistics
    qat.apply(disable_fake_quant)
    with torch.no_grad():
        for batch in calib:
            qat(batch)
    qat.apply(enable_fake_quant)
    ptq = accuracy(qat, x_test, y_test)
    train_epochs(qat, data, seed)
    return ptq, accuracy(qat, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="write the per-seed figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_split(seed=0)
    calib = [data[0][i:i + 64] for i in range(0, 512, 64)]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        model = train_digits(seed=seed, data=data)
        fp32 = accuracy(model, data[2], data[3])
        flows = {name: partial(run_fxquant, kwargs=kw, range_lr=lr) for name, (kw, lr) in fxquant_flows().items()}
        flows["BN in training mode, fold after"] = run_bn_in_training
        flows["torch.ao prepare_qat_fx"] = run_torch_ao
        for name, flow in flows.items():
            start = time.perf_counter()
            ptq, qat = flow(model, data, calib, seed)
            rows.setdefault(name, []).append({"seed": seed, "fp32": fp32, "ptq": ptq, "qat": qat,
                                              "seconds": time.perf_counter() - start})
            print(f"seed {seed} {name:32s} fp32 {fp32:.2f}  PTQ {ptq:.2f}  QAT {qat:.2f}", flush=True)
    print(f"\n| flow | {' | '.join(f'seed {s} PTQ -> QAT' for s in args.seeds)} | mean QAT | min QAT | s/run |")
    print(f"|---|{'---|' * len(args.seeds)}---|---|---|")
    for name, runs in rows.items():
        cells = " | ".join(f"{r['ptq']:.2f} -> {r['qat']:.2f}" for r in runs)
        qats = [r["qat"] for r in runs]
        print(f"| {name} | {cells} | {statistics.mean(qats):.2f} | {min(qats):.2f} | "
              f"{statistics.mean(r['seconds'] for r in runs):.1f} |")
    fp32s = [f"{r['fp32']:.2f}" for r in next(iter(rows.values()))]
    print(f"\nfp32: {', '.join(fp32s)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
