"""AdaRound's learned rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Each weight is rounded down or up instead of to nearest: ``W_soft = s * clamp(floor(W / s) + h(V), qmin, qmax)``
with the rectified sigmoid ``h``, ``V`` learned, and a regularizer with an annealed exponent that drives every
``h(V)`` to 0 or 1. The scale ``s`` (the weight quantizer's step, per output channel) stays as calibrated.

Export reproduces the learned codes exactly: the float weight is replaced by ``s * q``, so round-to-nearest
with the unchanged scale (QuantizeLinear in ONNX, the fake quantizer in torch) gives back ``q``.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant import qmath
from fxquant.ptq.layers import Layer

ZETA, GAMMA = 1.1, -0.1


class SoftRounding(nn.Module):
    """The rounding variables of one weight: ``weight()`` is the soft-rounded weight, ``codes()`` the hard one."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        scaled = weight.detach() / scale
        self.register_buffer("floor", torch.floor(scaled))
        self.register_buffer("nearest", torch.clamp(torch.round(scaled), qmin, qmax))  # as the quantizer rounds
        rest = (scaled - self.floor).clamp(0.0, 1.0)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))  # h(V) == rest at the start
        self.qmin, self.qmax = qmin, qmax

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def weight(self) -> torch.Tensor:
        return self.scale * torch.clamp(self.floor + self.h(), self.qmin, self.qmax)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.V >= 0).to(self.floor.dtype), self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


def rounding_for(layer: Layer) -> SoftRounding | None:
    """Rounding variables for ``layer``'s weight at its quantizer's scale; None for affine weight quantization
    (a zero point), which AdaRound does not cover."""
    quantizer = layer.quantizer
    spec = quantizer.spec
    if not spec.symmetric:
        return None
    weight = layer.weight.detach()
    axis = quantizer._axis(weight)
    scale = qmath.along_axis(quantizer.scale.detach().to(weight.device), weight.dim(), axis)
    return SoftRounding(weight.float(), scale.expand_as(weight).float().clone(), spec.qmin, spec.qmax)


@torch.no_grad()
def harden(layer: Layer, soft: SoftRounding) -> torch.Tensor:
    """Replace ``layer``'s weight by ``s * q`` for the learned codes ``q`` (returned): round-to-nearest at the
    quantizer's unchanged scale gives ``q`` back."""
    codes = soft.codes()
    layer.weight.copy_((soft.scale * codes).to(layer.weight.dtype))
    return codes
