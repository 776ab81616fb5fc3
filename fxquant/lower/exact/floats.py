"""ONNX Runtime's float kernels (MLAS, x86 with FMA) in torch, as close as torch allows.

Elementwise kernels whose MLAS code is a fixed sequence of float32 operations are reproduced operation by
operation (``fma32`` for each fused multiply-add), so they match bit for bit: the logistic function (Sigmoid and
the QLinearSigmoid table).
"""

from __future__ import annotations

import torch

from fxquant.lower.exact.arith import fma32

_F32 = torch.float32
# MLAS's logistic constants (Eigen's rational approximation)
_LOGISTIC_P = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
               2.48287947061529e-01)
_LOGISTIC_Q = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
               1.16817656904453e-01, 9.93151921023180e-01)


def _const(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=_F32)


def _horner(x2: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    acc = fma32(x2, _const(coefficients[0]), _const(coefficients[1]))
    for c in coefficients[2:]:
        acc = fma32(acc, x2, _const(c))
    return acc


def mlas_logistic(x: torch.Tensor) -> torch.Tensor:
    """MlasComputeLogistic (FMA3 kernel): clamp to [-18, 18], odd/even polynomials by Horner with FMA,
    ``p / q + 0.5`` clamped to [0, 1]."""
    v = x.float().clamp(-18.0, 18.0)
    v2 = v * v
    p = _horner(v2, _LOGISTIC_P) * v
    q = _horner(v2, _LOGISTIC_Q)
    return (p / q + 0.5).clamp(0.0, 1.0)


_ERF_SMALL = (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1, 1.28379151e-1)
_ERF_BIG = (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
            1.28717512e-1)
_EXP = (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0)
_LOG2E, _LOG2_HI, _LOG2_LO, _EXP_C = 1.44269504088896341, -6.93145752e-1, -1.42860677e-6, 1.25829120e+7


def _chain(start: torch.Tensor, x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    acc = start
    for c in coefficients:
        acc = fma32(acc, x, _const(c))
    return acc


def erf(x: torch.Tensor) -> torch.Tensor:
    """MlasErfKernelFma3: a polynomial in x^2 below |x| = 0.921875, ``1 - exp(-poly(|x|))`` above (MLAS's own exp,
    2^i by exponent bits), the sign copied back; each multiply-add fused."""
    x = x.float()
    va = torch.minimum(x.abs(), _const(3.925))
    big = _const(0.921875) <= va
    sq = va * va
    small = fma32(_chain(_const(_ERF_SMALL[0]), sq, _ERF_SMALL[1:]), va, va)
    small = torch.where(big, torch.zeros_like(small), small)
    vb = torch.where(big, va, torch.zeros_like(va))
    r = -fma32(_chain(_const(_ERF_BIG[0]), vb, _ERF_BIG[1:]), vb, vb)
    r = torch.maximum(r, _const(-88.3762626647949))
    t = fma32(_const(_LOG2E), r, _const(_EXP_C)) - _const(_EXP_C)  # round(r / ln 2) by the 1.5 * 2^23 trick
    f = fma32(t, _const(_LOG2_LO), fma32(t, _const(_LOG2_HI), r))
    y = _chain(_const(_EXP[0]), f, _EXP[1:])
    power = ((t.to(torch.int32) + 127) << 23).view(torch.float32)  # 2^trunc(t)
    y = _const(1.0) - y * power
    magnitude = torch.where(big, y, small)
    return torch.where(torch.signbit(x), -magnitude, magnitude)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """ORT's Gelu contrib op: ``0.5 * x * (erf(x * sqrt 1/2) + 1)``, left to right, MLAS's erf."""
    x = x.float()
    e = erf(x * _const(0.7071067811865476))
    return (_const(0.5) * x) * (e + _const(1.0))


_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """MLAS's Tanh kernel (Eigen's rational approximation): x clamped to [-9, 9], ``x * P(x^2) / Q(x^2)`` with
    each polynomial a chain of fused multiply-adds (bit for bit on both targets)."""
    x = x.float().clamp(-9.0, 9.0)
    sq = x * x
    p = _chain(fma32(sq, _const(_TANH_P[0]), _const(_TANH_P[1])), sq, _TANH_P[2:]) * x
    q = _chain(fma32(sq, _const(_TANH_Q[0]), _const(_TANH_Q[1])), sq, _TANH_Q[2:])
    return p / q


_EXP_POLY = tuple(float.fromhex(h) for h in ("0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5", "0x1.555450p-3",
                                             "0x1.fffff6p-2"))
_ROUNDING_BIAS = 12582912.0  # 1.5 * 2^23: adding it rounds to an integer
# The sum-of-exp kernel differs by vector width: "vnni" models AVX-512 (MlasComputeSumExpF32KernelAvx512F: 16 lanes,
# inputs clamped at -103.97, 2^m by vscalefps), "avx2" models AVX2 + FMA3 (...KernelFma3: 8 lanes, inputs clamped
# at -88.38, 2^m from exponent bits).
_SUM_EXP = {"vnni": (16, -103.9720840454), "avx2": (8, -88.3762626647949)}


def sum_exp_terms(x: torch.Tensor, negative_maximum: torch.Tensor, target: str) -> torch.Tensor:
    """MLAS's sum-of-exp kernel's terms ``exp(x - max)``: range reduction to ``2^m exp(r)``, a degree-6
    polynomial, every multiply-add fused (bit for bit)."""
    lanes, lower = _SUM_EXP[target]
    v = torch.maximum(x.float() + negative_maximum, _const(lower))
    biased = fma32(v, _const(1.44269504088896341), _const(_ROUNDING_BIAS))
    m = biased - _const(_ROUNDING_BIAS)
    v = fma32(m, _const(-1.42860677e-6), fma32(m, _const(-6.93145752e-1), v))
    p = _chain(_const(_EXP_POLY[0]), v, (*_EXP_POLY[1:], 1.0, 1.0))
    if lanes == 16:  # vscalefps: p * 2^m rounded once
        return (p.double() * torch.exp2(m.double())).float()
    return p * ((biased.view(torch.int32) << 23) + 0x3F800000).view(torch.float32)


def lane_sum(terms: torch.Tensor, lanes: int) -> torch.Tensor:
    """A float32 sum over the last axis as MLAS's vector kernels add: element i into lane ``i % lanes`` in order,
    16 lanes folded to 8, then pairwise (``vhaddps`` twice) and the two 128-bit halves."""
    pad = (-terms.shape[-1]) % lanes
    vectors = torch.nn.functional.pad(terms, (0, pad)).unflatten(-1, (-1, lanes))
    acc = vectors[..., 0, :]
    for k in range(1, vectors.shape[-2]):
        acc = acc + vectors[..., k, :]
    if lanes == 16:
        acc = acc[..., 8:] + acc[..., :8]
    pairs = acc[..., 0::2] + acc[..., 1::2]
    quads = pairs[..., 0::2] + pairs[..., 1::2]
    return quads[..., 1] + quads[..., 0]


def softmax(x: torch.Tensor, axis: int, target: str) -> torch.Tensor:
    """MlasComputeSoftmax on the CPU ``target``: the row maximum, the sum-of-exp kernel's terms and sum, then each
    term times ``1 / sum`` (bit for bit on both vector widths)."""
    x = x.float().movedim(axis, -1)
    terms = sum_exp_terms(x, -x.amax(-1, keepdim=True), target)
    total = lane_sum(terms, _SUM_EXP[target][0]).unsqueeze(-1)
    return (terms * (_const(1.0) / total)).movedim(-1, axis)


def sgemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MLAS's float GEMM for short reductions: each output a chain of fused multiply-adds over k in order."""
    a, b = a.float(), b.float()
    acc = torch.zeros((*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]))
    for k in range(a.shape[-1]):
        acc = fma32(a[..., :, k:k + 1], b[..., k:k + 1, :], acc)
    return acc


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                         heads: int, scale: float, target: str) -> torch.Tensor:
    """ORT's MultiHeadAttention CPU kernel for (B, S, N*H) inputs: ``softmax(q k^T * scale + bias) v`` per head,
    the products as MLAS's GEMM chains, the softmax as MLAS's."""
    batch, length, width = query.shape
    q, k, v = (t.float().reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (query, key, value))
    scores = sgemm(q, k.transpose(-1, -2))
    if scale != 1.0:
        scores = scores * _const(scale)
    if bias is not None:
        scores = scores + bias.float()
    probs = softmax(scores, -1, target)
    return sgemm(probs, v).transpose(1, 2).reshape(batch, length, width)
