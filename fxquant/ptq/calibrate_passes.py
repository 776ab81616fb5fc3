"""The PTQ passes calibrate() runs: SmoothQuant before calibration (it needs activation statistics and changes
the weights whose ranges are calibrated), AdaRound then bias correction after it (they need ranges).

The PTQ passes of prepare (BatchNorm statistics, equalization, bias absorption) are in ``fxquant.pipeline``.
"""

from __future__ import annotations

from torch import fx, nn

from fxquant.ptq.adaround import adaround
from fxquant.ptq.bias_correction import correct_bias
from fxquant.ptq.smoothquant import smoothable, smoothquant
from fxquant.report import PrepareReport
from fxquant.spec import QuantConfig


def smooths(prepared: nn.Module, config: QuantConfig, report: PrepareReport) -> bool:
    """True when calibrate() runs SmoothQuant first: asked for, not yet done, and a LayerNorm feeds a Linear."""
    return bool(config.smoothquant) and "smoothquant" not in report.ptq and (
        config.smoothquant is True or smoothable(prepared))


def needs_data(prepared: nn.Module, config: QuantConfig, report: PrepareReport) -> bool:
    """True when calibrate() reads its batches more than once (so it keeps them in a list)."""
    return (bool(config.adaround_options) or config.bias_correction_method == "empirical"
            or smooths(prepared, config, report))


def before_calibrate(prepared: nn.Module, batches: list, config: QuantConfig, report: PrepareReport) -> None:
    """SmoothQuant on the calibration batches, before ranges are calibrated (once per prepared model)."""
    if not smooths(prepared, config, report):
        return
    result = smoothquant(prepared, batches)
    if result.done or config.smoothquant is True:  # "auto" says nothing where there is nothing to smooth
        report.ptq["smoothquant"] = result


def after_calibrate(prepared: fx.GraphModule, batches: list, config: QuantConfig, progress: bool) -> None:
    """AdaRound, then bias correction, as the config asks (both need calibrated ranges)."""
    if config.adaround_options is not None:
        adaround(prepared, batches, config.adaround_options, progress=progress)
    method = config.bias_correction_method
    if method is not None:
        correct_bias(prepared, batches if method == "empirical" else None, method, progress=progress)
