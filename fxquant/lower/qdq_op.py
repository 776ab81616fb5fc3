"""The quantize-dequantize op that converted models call, and its ONNX translation.

torch's own fake-quant ops have no translation in the dynamo ONNX exporter, so converted models call
``torch.ops.fxquant.quantize_dequantize``: a torch.library custom op computing exactly what ONNX
QuantizeLinear -> DequantizeLinear compute (x / scale, round half to even, add zero point, saturate), plus
the translation below, passed to ``torch.onnx.export(custom_translation_table=...)``.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from fxquant import qmath
from fxquant.errors import ConversionError


@torch.library.custom_op("fxquant::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
                        qmax: int, clip: bool) -> torch.Tensor:
    """Per-tensor (scalar scale) or per-axis quantize-dequantize; the zero point's dtype is the Q type."""
    per_axis = None if scale.dim() == 0 else axis
    step = qmath.along_axis(scale, x.dim(), per_axis)
    zp = qmath.along_axis(zero_point.to(torch.float32), x.dim(), per_axis)
    return qmath.fake_quantize(x, step, zp, qmin, qmax).to(x.dtype)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax, clip):
    return torch.empty_like(x)


def _no_gradient(ctx, grad):
    raise ConversionError("a converted model is frozen for export: its Q/DQ ops have fixed scales and no gradient. "
                          "Train the model returned by fxquant.prepare_qat (after calibrate) and convert it after "
                          "training")


quantize_dequantize.register_autograd(_no_gradient)


def quantize_dequantize_onnx(x, scale, zero_point, axis: int, qmin: int, qmax: int, clip: bool):
    """QuantizeLinear -> [Clip to a range narrower than the integer type] -> DequantizeLinear."""
    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    if clip:
        q = op.Clip(q, op.CastLike(qmin, zero_point), op.CastLike(qmax, zero_point))
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


TRANSLATIONS = {torch.ops.fxquant.quantize_dequantize.default: quantize_dequantize_onnx}
