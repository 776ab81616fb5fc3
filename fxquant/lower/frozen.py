"""FrozenQuantizer: a calibrated quantizer reduced to constants, calling the exportable Q/DQ op."""

from __future__ import annotations

import torch
from torch import nn

from fxquant import qmath
from fxquant.errors import ConversionError
from fxquant.lower import qdq_op  # noqa: F401  (registers torch.ops.fxquant.quantize_dequantize)
from fxquant.quantizer import TensorQuantizer

_INT_TYPES = [(torch.int8, -128, 127), (torch.uint8, 0, 255), (torch.int16, -32768, 32767),
              (torch.uint16, 0, 65535)]


def storage_type(qmin: int, qmax: int) -> tuple[torch.dtype, int, int]:
    """The smallest integer type holding [qmin, qmax], with its own range."""
    for dtype, lo, hi in _INT_TYPES:
        if lo <= qmin and qmax <= hi:
            return dtype, lo, hi
    raise ConversionError(f"no integer type holds the range [{qmin}, {qmax}]")


class FrozenQuantizer(nn.Module):
    """Targets-dequantize with fixed scale and zero point: what a TensorQuantizer becomes in convert()."""

    def __init__(self, quantizer: TensorQuantizer, is_constant: bool) -> None:
        super().__init__()
        spec = quantizer.spec
        self.qmin, self.qmax = spec.qmin, spec.qmax
        dtype, lo, hi = storage_type(self.qmin, self.qmax)
        self.axis = spec.axis if spec.axis is not None else 0
        # A constant (weight) never leaves its calibrated range, so a narrow range needs no clip in ONNX.
        self.clip = not is_constant and (lo, hi) != (self.qmin, self.qmax)
        self.num_bits = spec.num_bits
        self.calib_method, self.constant = spec.calib_method, is_constant  # recorded in the ONNX metadata
        self.register_buffer("scale", quantizer.scale.detach().clone().float())
        self.register_buffer("zero_point", quantizer.zero_point.detach().round().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxquant.quantize_dequantize(x, self.scale, self.zero_point, self.axis, self.qmin,
                                                     self.qmax, self.clip)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.scale.dim() == 0 else f"axis={self.axis}"
        return f"{self.zero_point.dtype} [{self.qmin}, {self.qmax}] {kind}"


class FrozenDynamicQuantizer(nn.Module):
    """A dynamic quantizer in a converted model: uint8 with each forward's own range (DynamicQuantizeLinear)."""

    calib_method, constant = "dynamic", False  # recorded in the ONNX metadata

    def __init__(self, quantizer: TensorQuantizer) -> None:
        super().__init__()
        self.per_token = quantizer.spec.per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_token:  # no ONNX op for it: export_onnx refuses it with the reason
            return qmath.fake_quant_dynamic(x, per_token=True).to(x.dtype)
        return torch.ops.fxquant.dynamic_quantize_dequantize(x)

    def extra_repr(self) -> str:
        return f"uint8 dynamic {'per-token' if self.per_token else 'per-tensor'}"


def freeze(quantizer: TensorQuantizer) -> nn.Module:
    """The converted form of a quantizer: fixed Q/DQ, dynamic Q/DQ, or nothing when it is disabled."""
    if quantizer.mode == "disabled":
        return nn.Identity()
    if quantizer.spec.dynamic:
        return FrozenDynamicQuantizer(quantizer)
    return FrozenQuantizer(quantizer, quantizer.constant)
