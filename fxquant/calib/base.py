"""The calibrator contract."""

from __future__ import annotations

import torch

from fxquant.spec import QuantSpec

Stats = tuple[torch.Tensor, torch.Tensor]  # a calibrator's running (min, max): scalars or one per channel


class Calibrator:
    """Collects statistics of a tensor over calibration batches and proposes a range.

    ``axis`` None means one range for the whole tensor, an int one range per index along that axis.
    ``compute(spec, method)`` returns ``(min, max)``: scalars, or 1-D tensors with one entry per channel.
    ``methods`` lists the calib methods this calibrator's statistics can answer, so a range can be re-derived
    with another method without running the data again.
    """

    methods: tuple[str, ...] = ()
    mergeable = False  # whether ranks' statistics merge (``fxquant.calib.distributed``: merge_parts and merge)

    def __init__(self, axis: int | None) -> None:
        self.axis = axis
        self.num_batches = 0

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self, spec: QuantSpec, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.num_batches = 0

    # ---- merging across ranks (fxquant.calib.distributed) -------------------------------------------
    def minmax(self) -> Stats | None:
        """The running (min, max) collected so far, or None before any data."""
        return None

    def merge_meta(self) -> object:
        """What this rank tells the others before merging (a small picklable value; None: nothing)."""
        return None

    def merge_parts(self, shape: tuple[int, ...], metas: list[object]) -> tuple[list[torch.Tensor],
                                                                               list[torch.Tensor]]:
        """This rank's statistics for the merge: flat tensors all-reduced with MIN (float32) and with SUM (float64),
        neutral values when this rank saw no data. ``shape``: the statistics' shape on the ranks with data;
        ``metas``: every rank's ``merge_meta()`` (None for ranks without data)."""
        raise NotImplementedError

    def merge_sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """How many MIN-reduced and SUM-reduced elements ``merge_parts`` packs."""
        raise NotImplementedError

    def merge(self, mins: torch.Tensor, sums: torch.Tensor, shape: tuple[int, ...], counts: list[int],
              finite: bool, device: torch.device) -> None:
        """Take the merged statistics (this calibrator's slices of the reduced tensors). ``counts``: every rank's
        batch count; ``finite``: False when any rank saw NaN/Inf (the range then becomes NaN on every rank, so
        that all report it alike); ``device``: where statistics land on a rank that saw no data."""
        raise NotImplementedError


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def place(values: torch.Tensor, shape: tuple[int, ...], device: torch.device, finite: bool) -> torch.Tensor:
    """Merged statistics as float32 of ``shape`` on ``device``; all NaN when a rank saw NaN/Inf."""
    out = values.float().reshape(shape).to(device)
    return out if finite else torch.full_like(out, float("nan"))


def has_stats(calibrator: Calibrator) -> bool:
    return calibrator.num_batches > 0 and calibrator.minmax() is not None


def minmax_parts(calibrator: Calibrator, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Minima and negated maxima, for one MIN all-reduce (+inf from a rank that saw no data)."""
    if has_stats(calibrator):
        lo, hi = calibrator.minmax()
        return [lo.float().flatten(), -hi.float().flatten()]
    return [torch.full((2 * numel(shape),), float("inf"))]


def merged_minmax(mins: torch.Tensor, shape: tuple[int, ...], device: torch.device, finite: bool) -> Stats:
    """The (min, max) of ``minmax_parts`` after the MIN all-reduce."""
    n = numel(shape)
    return place(mins[:n], shape, device, finite), place(-mins[n:2 * n], shape, device, finite)
