"""Calibration helpers shared by the calibrator tests: a quantizer or a histogram fed the given batches."""

from __future__ import annotations

import torch

from fxquant import QuantSpec, TensorQuantizer
from fxquant.calib import HistogramCalibrator


def calibrated(spec: QuantSpec, *batches: torch.Tensor) -> TensorQuantizer:
    q = TensorQuantizer(spec)
    q.set_mode("calib")
    for b in batches:
        q(b)
    q.load_calib_amax()
    q.set_mode("quant")
    return q


def histogram(*batches: torch.Tensor, max_samples: int | None = QuantSpec.hist_samples) -> HistogramCalibrator:
    cal = HistogramCalibrator(None, max_samples)
    for b in batches:
        cal.collect(b)
    return cal
