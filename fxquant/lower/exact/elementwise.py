"""ONNX Runtime's quantized elementwise, pooling and table kernels (x86) in torch, bit for bit.

- QuantizeLinear: ``RNE(clamp(x / scale, qmin - zp, qmax - zp)) + zp`` (true division);
  DequantizeLinear: ``float32(q - zp) * scale``.
- QLinearAdd (MLAS's AVX2 kernel): float32 ratios ``sa / sc``, ``sb / sc``; a constant term ``zc - (ra * za + rb
  * zb)`` with its inner multiply-add fused; per element ``fma(a, ra, fma(b, rb, constant))`` rounded half to
  even and saturated; where ORT's broadcast loop takes ``a`` as a scalar span, ``fma(b, rb, fma(a, ra,
  constant))``.
- QLinearMul: the exact integer product ``(a - za)(b - zb)``, then ``float32(product * float32(sa * sb / sc)) + zc``
  rounded (the zero point is added before rounding).
- QLinearSigmoid, QLinearLeakyRelu, QLinearConcat with another scale: a 256-entry table: each code dequantized,
  transformed (ORT's logistic polynomial, ``v >= 0 ? v : alpha * v``, identity), quantized.
- QLinearAveragePool: dequantized inputs summed in float32 in window order, divided by the count, then
  ``RNE(y / ys + zy)``. QLinearGlobalAveragePool: the integer sum plus ``-zx * HW``, requantized with
  ``float32(sx / float32(sy * HW))``.
- QLinearSoftmax: a table of ``exp`` (float64, shifted so the row maximum maps to the last entry), a float32 sum
  in order, ``RNE(t * floor(1 / ys) / sum) + zy``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxquant.errors import ConversionError
from fxquant.lower.exact.arith import fma32, int_to_f32, requantize, saturate_round
from fxquant.lower.exact.floats import mlas_logistic


def _info(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _per_axis(values: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if values.dim() == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return values.reshape(shape)


def quantize_linear(x, y_scale, y_zero_point=None, *, axis: int = 1, **_):
    """QuantizeLinear (MLAS): divide, clamp to the range shifted by the zero point, round half to even, shift."""
    zero = y_zero_point if y_zero_point is not None else torch.tensor(0, dtype=torch.uint8)
    lo, hi = _info(zero.dtype)
    scale = _per_axis(y_scale.float(), x.dim(), axis)
    zp = _per_axis(zero.to(torch.float32), x.dim(), axis)
    v = torch.minimum(torch.maximum(x.float() / scale, lo - zp), hi - zp)
    return (torch.round(v) + zp).to(zero.dtype)


def dequantize_linear(x, x_scale, x_zero_point=None, *, axis: int = 1, **_):
    """DequantizeLinear: ``float32(x - zp) * scale`` (per axis when the scale is a vector)."""
    zero = x_zero_point if x_zero_point is not None else torch.tensor(0, dtype=x.dtype)
    shifted = x.to(torch.int64) - _per_axis(zero.to(torch.int64), x.dim(), axis)
    return int_to_f32(shifted) * _per_axis(x_scale.float(), x.dim(), axis)


def _scalar_side(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Which input ORT's broadcast loop treats as a scalar span: "a", "b" or None (element by element)."""
    if a.numel() == 1:
        return "a"
    if b.numel() == 1:
        return "b"
    shape = torch.broadcast_shapes(a.shape, b.shape)
    sa = [1] * (len(shape) - a.dim()) + list(a.shape)
    sb = [1] * (len(shape) - b.dim()) + list(b.shape)
    for axis in reversed(range(len(shape))):
        if shape[axis] == 1:
            continue
        if sa[axis] == 1:
            return "a"
        if sb[axis] == 1:
            return "b"
        return None
    return None


def qlinear_add(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None, **_):
    """QLinearAdd (com.microsoft), MLAS's AVX2 kernel."""
    zc_t = c_zero_point if c_zero_point is not None else torch.tensor(0, dtype=a.dtype)
    ra = a_scale.float() / c_scale.float()
    rb = b_scale.float() / c_scale.float()
    za, zb, zc = (t.to(torch.float32) if t is not None else torch.tensor(0.0) for t in (a_zero_point, b_zero_point,
                                                                                         zc_t))
    constant = zc - fma32(ra, za, rb * zb)
    fa, fb = a.to(torch.float32), b.to(torch.float32)
    if _scalar_side(a, b) == "a":  # the scalar span's term goes into the constant first
        v = fma32(fb, rb, fma32(fa, ra, constant))
    else:
        v = fma32(fa, ra, fma32(fb, rb, constant))
    return saturate_round(v, *_info(zc_t.dtype)).to(zc_t.dtype)


def qlinear_mul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None, **_):
    """QLinearMul (com.microsoft): exact integer product, one float32 multiply, the zero point added in float."""
    zc_t = c_zero_point if c_zero_point is not None else torch.tensor(0, dtype=a.dtype)
    za = a_zero_point.to(torch.int64) if a_zero_point is not None else 0
    zb = b_zero_point.to(torch.int64) if b_zero_point is not None else 0
    product = (a.to(torch.int64) - za) * (b.to(torch.int64) - zb)
    ratio = (a_scale.float() * b_scale.float()) / c_scale.float()
    v = int_to_f32(product) * ratio + zc_t.to(torch.float32)
    return saturate_round(v, *_info(zc_t.dtype)).to(zc_t.dtype)


def lookup_table(x_scale, x_zero_point, y_scale, y_zero_point, fn, dtype: torch.dtype) -> torch.Tensor:
    """ORT's 256-entry table: every code dequantized (``sx * float32(i - zx)``), transformed by ``fn`` (float32 ->
    float32), quantized as QuantizeLinear."""
    lo, hi = _info(dtype)
    codes = torch.arange(lo, hi + 1, dtype=torch.int64)
    zx = x_zero_point.to(torch.int64) if x_zero_point is not None else 0
    dq = x_scale.float() * (codes - zx).float()
    zero = y_zero_point if y_zero_point is not None else torch.tensor(0, dtype=dtype)
    return quantize_linear(fn(dq), y_scale, zero)


def apply_table(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    lo = torch.iinfo(x.dtype).min
    return table[(x.to(torch.int64) - lo)]


def qlinear_sigmoid(x, x_scale, x_zero_point, y_scale, y_zero_point, **_):
    return apply_table(x, lookup_table(x_scale, x_zero_point, y_scale, y_zero_point, mlas_logistic, x.dtype))


def qlinear_leaky_relu(x, x_scale, x_zero_point, y_scale, y_zero_point, *, alpha: float = 0.01, **_):
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    return apply_table(x, lookup_table(x_scale, x_zero_point, y_scale, y_zero_point,
                                       lambda v: torch.where(v >= 0, v, alpha32 * v), x.dtype))


def qlinear_concat(y_scale, y_zero_point, *inputs, axis: int, **_):
    """QLinearConcat (com.microsoft): inputs given as (tensor, scale, zero point) triples; each copied when its
    scale and zero point are the output's, else mapped through a requantization table."""
    parts = []
    for k in range(0, len(inputs), 3):
        x, sx, zx = inputs[k:k + 3]
        if torch.equal(sx.float().reshape(()), y_scale.float().reshape(())) and \
                torch.equal(zx.reshape(()), y_zero_point.reshape(())):
            parts.append(x)
        else:
            parts.append(apply_table(x, lookup_table(sx, zx, y_scale, y_zero_point, lambda v: v, x.dtype)))
    return torch.cat(parts, axis)


def _sum_f32_in_order(terms: list[torch.Tensor]) -> torch.Tensor:
    total = terms[0].float()
    for t in terms[1:]:
        total = total + t  # one float32 rounding per term, in ORT's order
    return total


def qlinear_average_pool(x, x_scale, x_zero_point, y_scale, y_zero_point, *, kernel_shape, strides=None,
                         pads=None, count_include_pad: int = 0, ceil_mode: int = 0, channels_last: int = 0,
                         auto_pad: str = "NOTSET", **_):
    """QLinearAveragePool (com.microsoft), 1-D and 2-D, NCHW."""
    if channels_last or ceil_mode or auto_pad not in ("NOTSET", b"NOTSET"):
        raise ConversionError("QLinearAveragePool with channels_last, ceil_mode or auto_pad is not emulated")
    dims = len(kernel_shape)
    if dims not in (1, 2):
        raise ConversionError(f"QLinearAveragePool over {dims} dimensions is not emulated")
    strides = strides or [1] * dims
    pads = pads or [0] * (2 * dims)
    dq = dequantize_linear(x, x_scale, x_zero_point)
    if dims == 1:
        dq, kernel_shape, strides, pads = dq.unsqueeze(2), [1, *kernel_shape], [1, *strides], [0, pads[0], 0, pads[1]]
    ones = torch.ones_like(dq[:1, :1])
    padding = (pads[1], pads[3], pads[0], pads[2])
    padded, mask = F.pad(dq, padding), F.pad(ones, padding)
    kh, kw = kernel_shape
    sh, sw = strides
    out_h = (padded.shape[2] - kh) // sh + 1
    out_w = (padded.shape[3] - kw) // sw + 1
    terms, counts = [], []
    for i in range(kh):  # ORT's order: rows, then columns within a row
        for j in range(kw):
            window = (slice(None), slice(None), slice(i, i + sh * (out_h - 1) + 1, sh),
                      slice(j, j + sw * (out_w - 1) + 1, sw))
            terms.append(padded[window])
            counts.append(mask[window])
    total = _sum_f32_in_order(terms)
    count = torch.full_like(counts[0], kh * kw) if count_include_pad else sum(counts)
    y = total / count
    zero = y_zero_point if y_zero_point is not None else torch.tensor(0, dtype=x.dtype)
    codes = saturate_round(y / y_scale.float() + zero.to(torch.float32), *_info(zero.dtype)).to(zero.dtype)
    return codes.squeeze(2) if len(kernel_shape) == 2 and x.dim() == 3 else codes


def qlinear_global_average_pool(x, x_scale, x_zero_point, y_scale, y_zero_point, *, channels_last: int = 0, **_):
    """QLinearGlobalAveragePool (com.microsoft): integer sums, requantized like a conv."""
    spatial = tuple(range(1, x.dim() - 1)) if channels_last else tuple(range(2, x.dim()))
    size = math.prod(x.shape[d] for d in spatial)
    zx = x_zero_point.to(torch.float64) if x_zero_point is not None else 0.0
    acc = x.double().sum(spatial, keepdim=True) - zx * size
    multiplier = x_scale.float() / (y_scale.float() * torch.tensor(float(size), dtype=torch.float32))
    zero = y_zero_point if y_zero_point is not None else torch.tensor(0, dtype=x.dtype)
    return requantize(acc, multiplier, zero.to(torch.int32), *_info(zero.dtype)).to(zero.dtype)


def qlinear_softmax(x, x_scale, x_zero_point, y_scale, y_zero_point, *, axis: int = -1, opset: int = 13, **_):
    """QLinearSoftmax (com.microsoft), uint8."""
    if x.dtype != torch.uint8:
        raise ConversionError("QLinearSoftmax with int8 inputs is not emulated (the onnxruntime presets use uint8)")
    axis = axis % x.dim()
    moved = x.movedim(axis, -1) if opset >= 13 else x.flatten(axis)
    length = moved.shape[-1]
    shift = max(0.0, math.log(torch.finfo(torch.float32).max / length) - 5.0) / float(x_scale.float())
    table = torch.exp((torch.arange(256, dtype=torch.float64) - 255 + shift) * float(x_scale.float())).float()
    index = moved.to(torch.int64) + (255 - moved.amax(-1, keepdim=True).to(torch.int64))
    values = table[index]
    total = _sum_f32_in_order(list(values.unbind(-1))).unsqueeze(-1)
    scale = torch.floor(1.0 / y_scale.float())
    q = torch.round((values * scale) / total) + y_zero_point.to(torch.float32)
    out = q.clamp(max=255).to(torch.uint8)
    return out.movedim(-1, axis) if opset >= 13 else out.reshape(x.shape)
