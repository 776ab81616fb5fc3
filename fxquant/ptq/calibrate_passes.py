"""The PTQ passes calibrate() runs after calibration (they need ranges): AdaRound, then bias correction.

The PTQ passes of prepare (BatchNorm statistics, equalization, bias absorption) are in ``fxquant.pipeline``.
"""

from __future__ import annotations

from torch import fx

from fxquant.ptq.adaround import adaround
from fxquant.ptq.bias_correction import correct_bias
from fxquant.spec import QuantConfig


def needs_data(config: QuantConfig) -> bool:
    """True when calibrate() re-reads its batches after calibration (so it keeps them in a list)."""
    return bool(config.adaround_options) or config.bias_correction_method == "empirical"


def after_calibrate(prepared: fx.GraphModule, batches: list, config: QuantConfig, progress: bool) -> None:
    """AdaRound, then bias correction, as the config asks (both need calibrated ranges)."""
    if config.adaround_options is not None:
        adaround(prepared, batches, config.adaround_options, progress=progress)
    method = config.bias_correction_method
    if method is not None:
        correct_bias(prepared, batches if method == "empirical" else None, method, progress=progress)
