"""The calibrator contract."""

from __future__ import annotations

import torch

from fxquant.spec import QuantSpec


class Calibrator:
    """Collects statistics of a tensor over calibration batches and proposes a range.

    ``axis`` None means one range for the whole tensor, an int one range per index along that axis.
    ``compute(spec, method)`` returns ``(min, max)``: scalars, or 1-D tensors with one entry per channel.
    ``methods`` lists the calib methods this calibrator's statistics can answer, so a range can be re-derived
    with another method without running the data again.
    """

    methods: tuple[str, ...] = ()

    def __init__(self, axis: int | None) -> None:
        self.axis = axis
        self.num_batches = 0

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self, spec: QuantSpec, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.num_batches = 0

    def data_min(self) -> torch.Tensor | None:
        """The smallest value collected (per channel where the calibrator keeps channels), or None: the data's own
        minimum, whatever range ``compute`` proposes (a symmetric method may propose -amax)."""
        return getattr(self, "_min", None)
