"""EMA calibrator: exponential moving averages of the per-batch min and max, with bias correction.

As Intel Distiller's FakeLinearQuantization tracks activation ranges: m_t = d * m_(t-1) + (1 - d) * x_t,
reported as m_t / (1 - d^t) so that early estimates are not pulled towards zero.
"""

from __future__ import annotations

import torch

from fxquant.calib.base import Calibrator, Stats, has_stats, numel, place
from fxquant.calib.max import channel_minmax
from fxquant.errors import CalibrationError, ConfigError


class EmaCalibrator(Calibrator):
    """Bias-corrected EMA of per-batch min and max, per tensor or per channel."""

    methods = ("ema",)
    mergeable = True  # the mean over the ranks with data of each one's bias-corrected EMA

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

    def minmax(self) -> Stats | None:
        return None if self._min is None else (self._min, self._max)

    def merge_sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return 0, 2 * numel(shape)

    def merge_parts(self, shape: tuple[int, ...], metas: list[object]) -> tuple[list[torch.Tensor],
                                                                               list[torch.Tensor]]:
        if not has_stats(self):
            return [], [torch.zeros(2 * numel(shape), dtype=torch.float64)]
        correction = 1 - self.decay ** self.num_batches
        return [], [self._min.double().flatten() / correction, self._max.double().flatten() / correction]

    def merge(self, mins: torch.Tensor, sums: torch.Tensor, shape: tuple[int, ...], counts: list[int],
              finite: bool, device: torch.device) -> None:
        n = numel(shape)
        contributors, steps = sum(c > 0 for c in counts), max(counts)
        correction = 1 - self.decay ** steps
        lo, hi = sums[:n] / contributors * correction, sums[n:2 * n] / contributors * correction
        self._min, self._max = place(lo, shape, device, finite), place(hi, shape, device, finite)
        self.num_batches = steps
