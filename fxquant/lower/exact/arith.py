"""float32 arithmetic as ONNX Runtime's CPU kernels perform it, bit for bit, in torch.

torch's float32 add, multiply and divide are IEEE single-precision operations, as are the SSE/AVX instructions
ORT's kernels use; what torch lacks is a fused multiply-add rounded once (``vfmadd``), which MLAS's AVX2 kernels
use. ``fma32`` computes it exactly: the product of two float32 numbers is exact in float64, the sum's rounding
error is recovered with TwoSum, and the one case where rounding the float64 sum to float32 differs from rounding
the exact sum (a float64 sum exactly halfway between two float32 numbers) is corrected by that error's sign.

Integer accumulations (sums of uint8 x int8 products) are computed in float64, exact for any realistic size
(|sum| < 2^53), and converted to float32 with round half to even, as ``cvtdq2ps`` converts int32.
"""

from __future__ import annotations

import torch

_INF = float("inf")


def fma32(a: torch.Tensor | float, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """``a * b + c`` rounded once to float32 (an FMA instruction); inputs are float32 values."""
    a, b, c = (torch.as_tensor(t, dtype=torch.float32).double() for t in (a, b, c))
    p = a * b  # exact: 24 + 24 significant bits fit in 53
    s = p + c
    back = s - p
    err = (p - (s - back)) + (c - back)  # TwoSum: p + c == s + err exactly
    r = s.float()
    inexact = err != 0
    if not bool(inexact.any()):  # the float64 sum is exact: rounding it once is the FMA's rounding
        return r
    si, ei, ri = s[inexact], err[inexact], r[inexact]
    gap = si - ri.double()  # exact
    other = torch.nextafter(ri, torch.where(gap > 0, _INF, -_INF).float())
    # a float64 sum on a float32 tie: the exact sum lies on err's side of it
    halfway = (gap != 0) & (gap.abs() * 2 == (other.double() - ri.double()).abs())
    r[inexact] = torch.where(halfway & ((ei > 0) == (gap > 0)), other, ri)
    return r


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """float32 square root rounded correctly (``sqrtps``), on any CPU: torch's own float32 sqrt on AVX-512 is not
    (measured: 6390 of 1M values one ulp off). Rounding the float64 root of a float32 number once to float32 gives
    the correctly rounded result."""
    return x.float().double().sqrt().float()


def int_to_f32(acc: torch.Tensor) -> torch.Tensor:
    """float32 of an exact integer accumulation held in float64 (round half to even, as ``cvtdq2ps``)."""
    return acc.to(torch.float64).float()


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int | torch.Tensor,
               qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """MLAS's ``MlasRequantizeOutput``: ``zero_point + RNE(clamp(float32(acc) * multiplier, qmin - zero_point,
    qmax - zero_point))`` in float32, as integer codes (int32 tensor)."""
    zp = torch.as_tensor(zero_point, dtype=torch.float32)
    v = int_to_f32(acc) * multiplier.float()
    v = torch.minimum(torch.maximum(v, qmin - zp), qmax - zp)
    return (torch.round(v) + zp).to(torch.int32)


def saturate_round(v: torch.Tensor, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """``cvtps2dq`` (round half to even) then saturating packs to [qmin, qmax]: int32 codes."""
    return torch.round(v).clamp(qmin, qmax).to(torch.int32)
