"""Error metrics: the one SQNR of fxquant (``sqnr`` for two tensors, ``SqnrAccumulator`` over many batches)."""

from __future__ import annotations

import math

import torch


def sqnr_from_energies(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB; inf when the noise is 0, -inf when the signal is 0 (and noise not)."""
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


class SqnrAccumulator:
    """Running SQNR over many batches: the sums (in float64) of signal and noise energy."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        reference = torch.as_tensor(reference).detach().double()
        test = torch.as_tensor(test).detach().to(reference.device).double()
        self.signal += reference.pow(2).sum().item()
        self.noise += (reference - test).pow(2).sum().item()

    @property
    def db(self) -> float:
        return sqnr_from_energies(self.signal, self.noise)


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2); inf when equal."""
    acc = SqnrAccumulator()
    acc.add(reference, test)
    return acc.db
