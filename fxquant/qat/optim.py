"""Optimizers for QAT: parameter groups with their own learning rate for learned ranges, and check_optimizer,
which catches an optimizer that would train nothing, or not all, of a QAT model."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.errors import ConfigError, ConfigTypeError
from fxquant.qat.prepare import QATError
from fxquant.qat.quantizer import QATQuantizer


def param_groups(model: nn.Module, range_lr: float) -> list[dict]:
    """Two optimizer parameter groups: the model's weights (the optimizer's learning rate) and its learned
    ranges (``range_lr``).

    Adam and its relatives normalize each gradient, so LSQ's gradient scale cannot slow the ranges down under
    them: a range moves by about the learning rate per step whatever its size. On the digits CNN, ranges at a
    tenth of the weights' learning rate did best (README, "Quantization-aware training").
    """
    if isinstance(range_lr, bool) or not isinstance(range_lr, (int, float)) or not range_lr > 0:
        raise ConfigError(f"range_lr must be a learning rate > 0, got {range_lr!r}")
    ranges = {id(p) for q in model.modules() if isinstance(q, QATQuantizer) for p in q.parameters(recurse=False)}
    if not ranges:
        raise QATError("this model has no learned ranges yet: use QuantSpec(learn_amax=True) in prepare_qat's "
                       "config and call fxquant.calibrate before building the optimizer")
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in ranges]},
            {"params": [p for p in params if id(p) in ranges], "lr": range_lr}]


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise QATError unless ``optimizer`` holds every trainable parameter of the QAT ``model``.

    The usual mistakes: an optimizer built on the float model before ``prepare_qat`` (which trains a copy, so
    the optimizer steps tensors the prepared model never reads), and one built before ``calibrate`` (which is
    when learned ranges become parameters). ``model`` may be wrapped (e.g. in DistributedDataParallel).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigTypeError(f"check_optimizer() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    if not held & names.keys():
        raise QATError("the optimizer holds none of this model's parameters: it was built before prepare_qat() "
                       "(prepare_qat trains a copy of the float model, never the model itself); build it after "
                       "calibrate(): torch.optim.Adam(prepared.parameters(), ...)")
    missing = [name for pid, name in names.items() if pid not in held]
    if missing:
        ranges = [n for n in missing if n.endswith(("._min", "._max"))]
        why = (" (learned ranges become parameters when calibrate() sets them: build the optimizer after "
               "fxquant.calibrate)") if ranges else ""
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise QATError(f"the optimizer misses {len(missing)} trainable parameter(s) of the model: {shown}{why}; "
                       "rebuild it from model.parameters()")
    if not any(isinstance(m, QATQuantizer) for m in model.modules()):
        raise QATError("this model has no QAT quantizers: make it with fxquant.prepare_qat(model, example_inputs)")
