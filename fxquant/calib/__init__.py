"""Calibrators: they watch tensors during calibration and propose a range.

``CALIBRATORS`` maps each ``QuantSpec.calib_method`` name (``fxquant.spec.CALIB_METHODS``, which owns the
names) to its calibrator class. The histogram methods share one calibrator, so a range can be re-derived
with another of them from the same collected histogram.
"""

from fxquant.calib.base import Calibrator
from fxquant.calib.ema import EmaCalibrator
from fxquant.calib.histogram import HistogramCalibrator
from fxquant.calib.max import MaxCalibrator
from fxquant.spec import HISTOGRAM_METHODS, QuantSpec

CALIBRATORS: dict[str, type[Calibrator]] = {
    "max": MaxCalibrator,
    "ema": EmaCalibrator,
    **dict.fromkeys(sorted(HISTOGRAM_METHODS), HistogramCalibrator),
}


def make_calibrator(spec: QuantSpec) -> Calibrator:
    """The calibrator a spec asks for."""
    if spec.calib_method == "ema":
        return EmaCalibrator(spec.axis, spec.ema_decay)
    if spec.calib_method in HISTOGRAM_METHODS:
        return HistogramCalibrator(spec.axis, spec.hist_samples)
    return CALIBRATORS[spec.calib_method](spec.axis)

__all__ = ["CALIBRATORS", "HISTOGRAM_METHODS", "Calibrator", "EmaCalibrator", "HistogramCalibrator",
           "MaxCalibrator", "make_calibrator"]
