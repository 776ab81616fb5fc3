"""Options of the data-driven PTQ passes (kept free of other fxquant imports: QuantConfig holds them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxquant.errors import ConfigError

BIAS_CORRECTION_METHODS = ("empirical", "analytical")


@dataclass(frozen=True)
class AdaRoundOptions:
    """AdaRound (Nagel et al. 2020) settings; defaults follow the paper and AIMET, scaled for speed.

    Args:
        iterations: Adam steps per layer.
        batch_size: samples per step, drawn from the captured layer inputs.
        num_samples: most calibration samples whose layer inputs are kept (memory: one layer at a time).
        lr: Adam learning rate of the rounding variables.
        reg_weight: lambda, weight of the regularizer that pushes each rounding to 0 or 1.
        beta_start, beta_end: the regularizer's exponent, annealed linearly after the warm-up.
        warm_up: share of the iterations without the regularizer.
        seed: seeds the sampling of steps, so a run is reproducible.
    """

    iterations: int = 1000
    batch_size: int = 64
    num_samples: int = 1024
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_up: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "num_samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ConfigError(f"AdaRoundOptions.{name} must be a positive int, got {value!r}")
        for name in ("lr", "reg_weight", "beta_start", "beta_end", "warm_up"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"AdaRoundOptions.{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.warm_up < 1:
            raise ConfigError(f"AdaRoundOptions.warm_up must be in [0, 1), got {self.warm_up}")
        if self.lr == 0:
            raise ConfigError("AdaRoundOptions.lr must be > 0")
