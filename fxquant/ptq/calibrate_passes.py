"""The PTQ passes calibrate() runs: SmoothQuant, then the outlier-channel split, before calibration (they need
activation statistics and change the weights whose ranges are calibrated), AdaRound then bias correction after
it (they need ranges).

The PTQ passes of prepare (BatchNorm statistics, equalization, bias absorption) are in ``fxquant.pipeline``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import fx, nn

from fxquant.errors import ConfigError
from fxquant.ptq.activations import Forward
from fxquant.ptq.adaround import adaround
from fxquant.ptq.bias_correction import correct_bias
from fxquant.ptq.outlier_channels import split_outlier_channels, splittable
from fxquant.ptq.smoothquant import smoothable, smoothquant
from fxquant.report import PrepareReport
from fxquant.spec import QuantConfig


def smooths(prepared: nn.Module, config: QuantConfig, report: PrepareReport) -> bool:
    """True when calibrate() runs SmoothQuant first: asked for, not yet done, and a LayerNorm feeds a Linear."""
    return bool(config.smoothquant) and "smoothquant" not in report.ptq and (
        config.smoothquant is True or smoothable(prepared))


def splits(prepared: nn.Module, config: QuantConfig, report: PrepareReport) -> bool:
    """True when calibrate() looks for outlier input channels of Linears: asked for, not yet done, and a
    per-tensor activation quantizer feeds a Linear."""
    return bool(config.outlier_channels) and "outlier_channels" not in report.ptq and (
        config.outlier_channels is True or splittable(prepared))


def needs_data(prepared: nn.Module, config: QuantConfig, report: PrepareReport, distributed: bool = False) -> bool:
    """True when calibrate() reads its batches more than once (so it keeps them in a list)."""
    return (bool(config.adaround_options) or config.bias_correction_method == "empirical"
            or (not distributed and (smooths(prepared, config, report) or splits(prepared, config, report))))


# calibrate()'s data-driven passes that change the model: (name, whether it applies, the pass, whether skipping
# it under distributed calibration warns). SmoothQuant's trigger (a LayerNorm feeding Linears) means a
# transformer that loses accuracy without it; the split's (any Linear) also fits every CNN head, where a warning
# would be noise: the report note says it.
MODEL_CHANGING = (("smoothquant", smooths, smoothquant, True),
                  ("outlier_channels", splits, split_outlier_channels, False))


def before_calibrate(prepared: nn.Module, batches: Iterable, config: QuantConfig, report: PrepareReport,
                     run: Forward, distributed: bool = False) -> None:
    """SmoothQuant, then the outlier-channel split, on the calibration batches, before ranges are calibrated
    (each once per prepared model), each batch through ``run``. "auto" reports a pass only where it changed
    something. Under distributed calibration they would decide from each rank's own batches and change the
    ranks' models differently: "auto" skips them (with a report note), True raises."""
    for name, applies, run_pass, warn in MODEL_CHANGING:
        if not applies(prepared, config, report):
            continue
        setting = getattr(config, name)
        if distributed:
            why = (f"{name} decides from each rank's own calibration batches, so the ranks would change their "
                   "models differently")
            fix = (f"calibrate on one rank (fxquant.calibrate(..., distributed=False) under `if rank == 0`) to "
                   f"run it, or set QuantConfig({name}=False)")
            if setting is True:
                raise ConfigError(f"QuantConfig({name}=True) under distributed calibration: {why}; {fix}")
            note = f"{name} skipped under distributed calibration: {why}; {fix}"
            report.skipped.append(note)
            if warn:
                warnings.warn(note, stacklevel=3)
            continue
        result = run_pass(prepared, batches, run)
        if result.done or setting is True:
            report.ptq[name] = result


def after_calibrate(prepared: fx.GraphModule, batches: list, config: QuantConfig, progress: bool) -> None:
    """AdaRound, then bias correction, as the config asks (both need calibrated ranges)."""
    if config.adaround_options is not None:
        adaround(prepared, batches, config.adaround_options, progress=progress)
    method = config.bias_correction_method
    if method is not None:
        correct_bias(prepared, batches if method == "empirical" else None, method, progress=progress)
