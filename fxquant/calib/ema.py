"""EMA calibrator: exponential moving averages of the per-batch min and max, with bias correction.

As Intel Distiller's FakeLinearQuantization tracks activation ranges: m_t = d * m_(t-1) + (1 - d) * x_t,
reported as m_t / (1 - d^t) so that early estimates are not pulled towards zero.
"""

from __future__ import annotations

import torch

from fxquant.calib.base import Calibrator
from fxquant.calib.max import channel_minmax
from fxquant.errors import CalibrationError, ConfigError


class EmaCalibrator(Calibrator):
    """Bias-corrected EMA of per-batch min and max, per tensor or per channel."""

    methods = ("ema",)

    def __init__(self, axis: int | None, decay: float = 0.9) -> None:
        super().__init__(axis)
        self.decay = decay
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        lo, hi = channel_minmax(x.float(), self.axis)
        if self._min is None:
            self._min, self._max = torch.zeros_like(lo), torch.zeros_like(hi)
        elif lo.shape != self._min.shape:
            raise ConfigError(f"per-channel calibration along axis {self.axis} saw {lo.numel()} channels "
                              f"after {self._min.numel()}: the channel count must not change between batches")
        d = self.decay
        self._min = d * self._min + (1 - d) * lo
        self._max = d * self._max + (1 - d) * hi
        self.num_batches += 1

    def compute(self, spec: object = None, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._min is None:
            raise CalibrationError(f"{type(self).__name__}.compute() called before any data was collected: run "
                                   "the model on calibration batches in 'calib' mode (fxquant.calibrate) first")
        correction = 1 - self.decay ** self.num_batches
        return self._min / correction, self._max / correction

    def reset(self) -> None:
        super().reset()
        self._min = self._max = None
