"""ONNX Runtime's integer matrix kernels (MLAS, x86) in torch: QLinearConv, QGemm, QLinearMatMul, MatMulInteger,
MatMulIntegerToFloat, DynamicQuantizeMatMul, with the accumulation of the CPU target.

Each sums raw uint8 x int8 code products in int32 and corrects for the zero points with row and column sums.
On ``"vnni"`` CPUs (VNNI, AMX) the sums are exact. On ``"avx2"`` CPUs (x86 without VNNI) ``vpmaddubsw`` first adds
each adjacent pair of products along the reduction axis in a saturating int16; the reduction order is the
row-major order of the packed operand: ``in_features`` for matrix products, ``(kh, kw, in_channel)`` per group
for convolutions (NHWC im2col; with an odd channel count pairs straddle kernel taps; an odd length is padded with
a zero). Depthwise convolutions (one input and one output channel per group) run on a kernel that widens to 32
bits first: always exact. uint8 x uint8 products (attention's QLinearMatMul) are widened before any add: exact.

Sums are computed in float64, which holds them exactly. Only the pairs that can saturate (same-signed weight
pairs whose magnitudes exceed 32767 / 255) are evaluated one by one, so the AVX2 emulation costs nothing extra
for saturation-aware weights. The requantization is ``fxquant.lower.exact.arith.requantize``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.errors import ConversionError
from fxquant.lower.exact.arith import int_to_f32, requantize

INT16_MAX, INT16_MIN = 32767, -32768
_CHUNK = 1 << 24  # most elements of pair products evaluated at once


def _risky_pairs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, pair) indices of the weight pairs (2p, 2p + 1) of ``rows`` (R, K even) that can saturate int16
    with uint8 activations."""
    pairs = rows.reshape(rows.shape[0], -1, 2)
    high = 255 * pairs.clamp(min=0).sum(-1)
    low = 255 * pairs.clamp(max=0).sum(-1)
    return torch.nonzero((high > INT16_MAX) | (low < INT16_MIN), as_tuple=True)


def _saturation_correction(cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What int16 saturation of adjacent products subtracts from ``cols`` (B, K, L) raw uint8 columns times
    ``rows`` (R, K) int8 weights: (B, R, L) float64, zero where no pair saturates."""
    if rows.shape[1] % 2:
        rows, cols = F.pad(rows, (0, 1)), F.pad(cols, (0, 0, 0, 1))
    out = torch.zeros(cols.shape[0], rows.shape[0], cols.shape[2], dtype=torch.float64)
    r, p = _risky_pairs(rows)
    step = max(1, _CHUNK // max(1, cols.shape[0] * cols.shape[2]))
    for start in range(0, len(r), step):
        rr, pp = r[start:start + step], p[start:start + step]
        pair = cols[:, 2 * pp, :] * rows[rr, 2 * pp].view(1, -1, 1) + \
            cols[:, 2 * pp + 1, :] * rows[rr, 2 * pp + 1].view(1, -1, 1)
        out.index_add_(1, rr, pair.clamp(INT16_MIN, INT16_MAX) - pair)
    return out


def _saturates(target: str, a_dtype: torch.dtype, b_dtype: torch.dtype) -> bool:
    if target == "avx2" and a_dtype == torch.int8:
        raise ConversionError("exact emulation of ONNX Runtime's AVX2 kernels covers uint8 activations (the "
                              "onnxruntime presets' QuantSpec(8, symmetric=False)); int8 activations take another "
                              "kernel path there: use uint8 activations, or exact='vnni'")
    return target == "avx2" and b_dtype == torch.int8


def matmul_accumulate(a: torch.Tensor, za: torch.Tensor, b: torch.Tensor, zb: torch.Tensor,
                      target: str) -> torch.Tensor:
    """int32 sums of ``(a - za) @ (b - zb)`` (a: (..., M, K) codes, b: (K, N) or (..., K, N) codes; ``zb`` a
    scalar or one per column) as ORT's u8s8/u8u8 GEMM computes them on ``target``; float64."""
    ad, bd = a.double(), b.double()
    za, zb = za.double(), zb.double()
    if not _saturates(target, a.dtype, b.dtype):
        return (ad - za) @ (bd - zb)
    raw = ad @ bd
    k = bd.shape[-2]
    if bd.dim() == 2:  # a constant weight: only the pairs that can saturate
        cols = ad.reshape(-1, k).T.unsqueeze(0)  # (1, K, rows of a)
        raw = raw + _saturation_correction(cols, bd.T)[0].T.reshape(raw.shape)
    else:
        if k % 2:
            ad, bd = F.pad(ad, (0, 1)), F.pad(bd, (0, 0, 0, 1))
        pairs = ad.unflatten(-1, (-1, 2)).unsqueeze(-1) * bd.unflatten(-2, (-1, 2)).unsqueeze(-4)
        raw = pairs.sum(-2).clamp(INT16_MIN, INT16_MAX).sum(-2)
    return raw - za * bd.sum(-2, keepdim=True) - zb * ad.sum(-1, keepdim=True) + k * za * zb


def conv_accumulate(x: torch.Tensor, zx: torch.Tensor, w: torch.Tensor, groups: int, strides: list[int],
                    pads: list[int], dilations: list[int], target: str) -> torch.Tensor:
    """int32 sums of a convolution of codes ``x`` (N, C, *spatial) with zero point ``zx`` and int8 weight codes
    ``w`` (O, C/groups, *kernel), as ORT's QLinearConv computes them on ``target``; float64 (N, O, *out)."""
    dims = x.dim() - 2
    if dims not in (1, 2, 3):
        raise ConversionError(f"QLinearConv with {dims} spatial dimensions is not emulated")
    zx = zx.double()
    begin, end = pads[:dims], pads[dims:]
    padding = [p for d in reversed(range(dims)) for p in (begin[d], end[d])]
    shifted = F.pad(x.double() - zx, padding)  # ORT pads with the zero point: zero after the shift
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    out = conv(shifted, w.double(), None, strides, 0, dilations, groups)
    depthwise = w.shape[1] == 1 and w.shape[0] == groups
    if depthwise or not _saturates(target, x.dtype, w.dtype):
        return out
    if dims == 3:
        raise ConversionError("3-D QLinearConv on the 'avx2' target is not emulated; use exact='vnni'")
    raw = shifted + zx  # the raw uint8 codes ORT multiplies, the padding holding the zero point
    if dims == 1:
        raw, wk, st, dl = raw.unsqueeze(2), w.unsqueeze(2), [1, *strides], [1, *dilations]
    else:
        wk, st, dl = w, strides, dilations
    kernel = wk.shape[2:]
    per_group_out = wk.shape[0] // groups
    channels = wk.shape[1]
    corrections = []
    for g in range(groups):
        xg = raw[:, g * channels:(g + 1) * channels]
        cols = F.unfold(xg, kernel, dilation=dl, stride=st)  # (N, C*kh*kw, L), channel slowest
        cols = cols.unflatten(1, (channels, -1)).transpose(1, 2).flatten(1, 2)  # (kh, kw, c): channel fastest
        rows = wk[g * per_group_out:(g + 1) * per_group_out].double().movedim(1, -1).flatten(1)
        corrections.append(_saturation_correction(cols, rows))
    return out + torch.cat(corrections, 1).reshape(out.shape)


def _along(values: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if values.dim() == 0 or values.numel() == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None, *,
                 target: str, group: int = 1, strides=None, pads=None, dilations=None, **_):
    """QLinearConv: accumulate, add the int32 bias, requantize with ``float32(float32(sx * sw) / sy)``."""
    dims = x.dim() - 2
    strides, dilations = strides or [1] * dims, dilations or [1] * dims
    pads = pads or [0] * (2 * dims)
    if w_zero_point is not None and bool((w_zero_point != 0).any()):
        raise ConversionError("QLinearConv with a nonzero weight zero point is not emulated (fxquant's weights are "
                              "symmetric)")
    acc = conv_accumulate(x, x_zero_point, w, group, strides, pads, dilations, target)
    if bias is not None:
        acc = acc + _along(bias.double(), acc.dim(), 1)
    multiplier = (x_scale.float() * w_scale.float()) / y_scale.float()
    return requantize(acc, _along(multiplier, acc.dim(), 1), y_zero_point.to(torch.int32),
                      *_range(y_zero_point)).to(y_zero_point.dtype)


def _range(zero_point: torch.Tensor) -> tuple[int, int]:
    info = torch.iinfo(zero_point.dtype)
    return info.min, info.max


def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, *, target: str, **_):
    """QLinearMatMul: accumulate, requantize with ``float32(float32(sa * sb) / sy)`` (per column for a per-column
    ``sb``)."""
    acc = matmul_accumulate(a, a_zero_point, b, b_zero_point, target)
    multiplier = (a_scale.float() * b_scale.float()) / y_scale.float()
    return requantize(acc, multiplier, y_zero_point.to(torch.int32), *_range(y_zero_point)).to(y_zero_point.dtype)


def qgemm(a, a_scale, a_zero_point, b, b_scale, b_zero_point, c=None, y_scale=None, y_zero_point=None, *,
          target: str, transA: int = 0, transB: int = 0, alpha: float = 1.0, **_):
    """QGemm (com.microsoft): ``alpha`` A @ B + C with an int32 bias C, requantized with ``float32(float32(alpha *
    sa) * sb) / sy``; with no ``y_scale`` a float output ``float32(acc) * (alpha * sa * sb) + C``."""
    a = a.T if transA else a
    b = b.T if transB else b
    acc = matmul_accumulate(a, a_zero_point, b, b_zero_point, target)
    scale = torch.tensor(alpha, dtype=torch.float32) * a_scale.float() * b_scale.float()
    if y_scale is None:
        out = int_to_f32(acc) * scale
        return out if c is None else out + c.float()
    if c is not None:
        acc = acc + c.double()
    zero = y_zero_point if y_zero_point is not None else torch.tensor(0, dtype=torch.uint8)
    return requantize(acc, scale / y_scale.float(), zero.to(torch.int32), *_range(zero)).to(zero.dtype)


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None, *, target: str, **_):
    """MatMulInteger: int32 ``(a - za) @ (b - zb)``."""
    za = a_zero_point if a_zero_point is not None else torch.tensor(0)
    zb = b_zero_point if b_zero_point is not None else torch.tensor(0)
    return matmul_accumulate(a, za, b, zb, target).to(torch.int32)


def matmul_integer_to_float(a, b, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None, *,
                            target: str, **_):
    """MatMulIntegerToFloat (com.microsoft): ``float32(float32(acc) * float32(sa * sb)) + bias``: two roundings,
    no FMA."""
    za = a_zero_point if a_zero_point is not None else torch.tensor(0)
    zb = b_zero_point if b_zero_point is not None else torch.tensor(0)
    acc = matmul_accumulate(a, za, b, zb, target)
    out = int_to_f32(acc) * (a_scale.float() * b_scale.float())
    return out if bias is None else out + bias.float()


def dynamic_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear: the range widened to hold 0, ``scale = float32(max - min) / 255``, ``zero_point =
    RNE(clamp(-min / scale, 0, 255))``, codes ``RNE(x / scale) + zero_point`` saturated; (codes, scale, zp)."""
    x = x.float()
    lo = torch.clamp(x.min(), max=0.0) if x.numel() else torch.tensor(0.0)
    hi = torch.clamp(x.max(), min=0.0) if x.numel() else torch.tensor(0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
    codes = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return codes.to(torch.uint8), scale, zp.to(torch.uint8)


def dynamic_quantize_matmul(a, b, b_scale, b_zero_point=None, bias=None, *, target: str, **_):
    """DynamicQuantizeMatMul (com.microsoft): DynamicQuantizeLinear of ``a``, then MatMulIntegerToFloat."""
    codes, scale, zp = dynamic_quantize(a)
    return matmul_integer_to_float(codes, b, scale, b_scale, zp, b_zero_point, bias, target=target)
