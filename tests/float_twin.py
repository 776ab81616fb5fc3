"""The float function a prepared model keeps: every quantizer disabled and the biases calibrate()'s bias correction
shifted (on purpose: it compensates the weights' rounding, the onnxruntime default) put back."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.ptq.input_means import shifted_layers
from fxquant.quantizer import TensorQuantizer


def float_twin(prepared: nn.Module) -> nn.Module:
    twin = copy.deepcopy(prepared)
    with torch.no_grad():
        for layer, shift in shifted_layers(twin):
            layer.bias.add_(shift.to(layer.bias.dtype))
    for m in twin.modules():
        if isinstance(m, TensorQuantizer):
            m.set_mode("disabled")
    return twin
