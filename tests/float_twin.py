"""The float function a prepared model keeps: every quantizer disabled and the biases calibrate()'s bias correction
shifted (on purpose: it compensates the weights' rounding, the onnxruntime default) put back."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxquant
from fxquant.ptq.layers import quantized_layers
from fxquant.quantizer import TensorQuantizer


def float_twin(prepared: nn.Module) -> nn.Module:
    twin = copy.deepcopy(prepared)
    layers = {layer.name: layer for layer in quantized_layers(twin, calibrated=False)[0]}
    for m in twin.modules():
        if isinstance(m, TensorQuantizer):
            m.set_mode("disabled")
    report = fxquant.report_of(prepared).ptq.get("bias_correction")
    shifts = report.data.get("bias_shifts", {}) if report is not None else {}
    with torch.no_grad():
        for name, shift in shifts.items():
            layers[name].bias.add_(torch.tensor(shift, dtype=layers[name].bias.dtype))
    return twin
