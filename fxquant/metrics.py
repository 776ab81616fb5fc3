"""Error metrics."""

from __future__ import annotations

import math

import torch


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2); inf when equal."""
    reference = torch.as_tensor(reference).detach().double()
    test = torch.as_tensor(test).detach().double()
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
