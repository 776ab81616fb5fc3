"""FrozenQuantizer: a calibrated quantizer reduced to constants, calling the exportable Q/DQ op."""

from __future__ import annotations

import torch
from torch import nn

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
