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


def erf(x: torch.Tensor) -> torch.Tensor:
    return torch.erf(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """ORT's Gelu contrib op: ``0.5 * x * (1 + erf(x / sqrt 2))``."""
    return 0.5 * x * (1.0 + erf(x * torch.tensor(0.7071067811865476, dtype=_F32)))


def layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dims: list[int],
               epsilon: float) -> torch.Tensor:
    """ORT's LayerNormalization: mean and mean of squares, ``(x - mean) / sqrt(var + eps) * scale + bias``."""
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = x.sum(dims, keepdim=True) / n
    mean_square = (x * x).sum(dims, keepdim=True) / n
    std = torch.sqrt(mean_square - mean * mean + epsilon)
    y = (x - mean) / std * scale
    return y if bias is None else y + bias
