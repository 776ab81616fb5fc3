"""Calibrators: they watch tensors during calibration and propose a range.

``CALIBRATORS`` maps each ``QuantSpec.calib_method`` name to its class; it is the one registry of methods.
"""

from fxquant.calib.base import Calibrator
from fxquant.calib.max import MaxCalibrator

CALIBRATORS: dict[str, type[Calibrator]] = {"max": MaxCalibrator}

__all__ = ["CALIBRATORS", "Calibrator", "MaxCalibrator"]
