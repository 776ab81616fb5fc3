"""Weighted layers with a weight quantizer: the originals' parameters and names, a quantized weight in forward.

``with_weight_quantizer(module, quantizer)`` swaps the class of a Conv/ConvTranspose/Linear for its quantized
twin (as NVIDIA's tools do), keeping parameters, buffers and state-dict keys, and adds ``weight_quantizer``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fxquant.errors import ConfigTypeError


class _QuantConvNd:
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    pass


class _QuantConvTransposeNd:
    _fn = None
    _dims = 0

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              self._dims, self.dilation)
        return type(self)._fn(input, self.weight_quantizer(self.weight), self.bias, self.stride, self.padding,
                              output_padding, self.groups, self.dilation)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    _fn, _dims = F.conv_transpose1d, 1


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    _fn, _dims = F.conv_transpose2d, 2


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    _fn, _dims = F.conv_transpose3d, 3


class QuantLinear(nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight_quantizer(self.weight), self.bias)


QUANT_CLASSES: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d, nn.Linear: QuantLinear,
}
QUANTIZED_TYPES = frozenset(QUANT_CLASSES.values())


def has_quant_form(module: nn.Module) -> bool:
    """True when ``module``'s exact type has a quantized twin (subclasses may override forward)."""
    return type(module) in QUANT_CLASSES or type(module) in QUANTIZED_TYPES


def with_weight_quantizer(module: nn.Module, quantizer: nn.Module) -> nn.Module:
    """A quantized twin of ``module`` sharing its parameters, with ``weight_quantizer`` set."""
    cls = QUANT_CLASSES.get(type(module), type(module))
    if cls not in QUANTIZED_TYPES:
        raise ConfigTypeError(f"{type(module).__name__} has no quantized form; quantizable: "
                              f"{sorted(t.__name__ for t in QUANT_CLASSES)}")
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    twin.weight_quantizer = quantizer
    return twin
