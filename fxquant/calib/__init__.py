"""Calibrators: they watch tensors during calibration and propose a range.

``CALIBRATORS`` maps each ``QuantSpec.calib_method`` name to its calibrator class; it is the one registry of
methods. The histogram methods share one calibrator, so a range can be re-derived with another of them from
the same collected histogram.
"""

from fxquant.calib.base import Calibrator
from fxquant.calib.ema import EmaCalibrator
from fxquant.calib.histogram import HistogramCalibrator
from fxquant.calib.max import MaxCalibrator

CALIBRATORS: dict[str, type[Calibrator]] = {
    "max": MaxCalibrator,
    "ema": EmaCalibrator,
    "percentile": HistogramCalibrator,
    "entropy": HistogramCalibrator,
    "mse": HistogramCalibrator,
}
HISTOGRAM_METHODS = frozenset(m for m, cls in CALIBRATORS.items() if cls is HistogramCalibrator)


def make_calibrator(spec) -> Calibrator:
    """The calibrator a spec asks for."""
    if spec.calib_method == "ema":
        return EmaCalibrator(spec.axis, spec.ema_decay)
    return CALIBRATORS[spec.calib_method](spec.axis)

__all__ = ["CALIBRATORS", "HISTOGRAM_METHODS", "Calibrator", "EmaCalibrator", "HistogramCalibrator",
           "MaxCalibrator", "make_calibrator"]
