"""The calibrator contract."""

from __future__ import annotations

import torch


class Calibrator:
    """Collects statistics of a tensor over calibration batches and proposes a range.

    ``axis`` None means one range for the whole tensor, an int one range per index along that axis.
    ``compute()`` returns ``(min, max)``: scalars, or 1-D tensors with one entry per channel.
    """

    def __init__(self, axis: int | None) -> None:
        self.axis = axis
        self.num_batches = 0

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.num_batches = 0
