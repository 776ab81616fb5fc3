"""ONNX Runtime's LayerNormalization on x86 (MLAS's AVX2 LayerNorm kernel, rows of 8 or more values).

Per row of ``n`` values: the mean from a float64 sum (4 lanes, folded pairwise, then the tail in order) rounded
to float32; the variance as a centered float32 sum of squared deviations (8 lanes of fused multiply-adds, folded
as the kernel folds them, then the tail); ``inv = 1 / sqrt(var / n + eps)`` in float32 (the root correctly
rounded: ``arith.sqrt32``); each output ``fma((x - mean) * inv, scale, bias)``. Bit for bit when ``n`` is a
multiple of 8 (every transformer width); with a tail of 1-7 values the variance's tail order is not the
kernel's (measured: 2-7 of 256 rows one ulp off). Rows shorter than 8 take ORT's scalar path, followed as
written (not verified).
"""

from __future__ import annotations

import torch

from fxquant.lower.exact.arith import fma32, sqrt32

_F32 = torch.float32


def _fold(acc: torch.Tensor) -> torch.Tensor:
    """A horizontal sum of 8 or 4 lanes as the AVX2 kernel folds it: halves added, then pairs, then the two."""
    if acc.shape[-1] == 8:
        acc = acc[..., :4] + acc[..., 4:]
    acc = acc[..., :2] + acc[..., 2:]
    return acc[..., 0] + acc[..., 1]


def _mean(rows: torch.Tensor) -> torch.Tensor:
    n = rows.shape[-1]
    body = n - n % 4
    lanes = rows[:, :body].double().unflatten(-1, (-1, 4))
    acc = torch.zeros(rows.shape[0], 4, dtype=torch.float64)
    for k in range(lanes.shape[1]):
        acc = acc + lanes[:, k]
    total = _fold(acc)
    for i in range(body, n):
        total = total + rows[:, i].double()
    return (total / n).float()


def _variance_sum(rows: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    n = rows.shape[-1]
    body = n - n % 8
    d = (rows - mean[:, None])
    lanes = d[:, :body].unflatten(-1, (-1, 8))
    acc = torch.zeros(rows.shape[0], 8, dtype=_F32)
    for k in range(lanes.shape[1]):
        acc = fma32(lanes[:, k], lanes[:, k], acc)
    total = _fold(acc)
    for i in range(body, n):
        total = total + d[:, i] * d[:, i]
    return total


def layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dims: list[int],
               epsilon: float) -> torch.Tensor:
    """LayerNormalization over the trailing ``dims`` of ``x``."""
    x = x.float()
    shape = x.shape
    rows = x.reshape(-1, int(torch.tensor(shape[dims[0]:]).prod()) if dims else 1)
    n = rows.shape[-1]
    eps = torch.tensor(epsilon, dtype=_F32)
    if n >= 8:
        mean = _mean(rows)
        inv = torch.ones(()) / sqrt32(_variance_sum(rows, mean) / torch.tensor(float(n), dtype=_F32) + eps)
    else:  # ORT's scalar path
        mean = rows.sum(-1) / n
        inv = torch.ones(()) / sqrt32(((rows - mean[:, None]) ** 2).sum(-1) / n + eps)
    y = (rows - mean[:, None]) * inv[:, None]
    s = scale.float().reshape(1, -1)
    y = y * s if bias is None else fma32(y, s, bias.float().reshape(1, -1))
    return y.reshape(shape)
