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
from fxquant.ptq.outlier_channels import OutlierWatch, split_outlier_channels, splittable
from fxquant.ptq.report import PTQReport
from fxquant.ptq.smoothquant import smoothable, smoothquant
from fxquant.quantizer import TensorQuantizer
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


def float_pass(prepared: nn.Module) -> bool:
    """True when calibrate's own pass runs the float model: every quantizer it does not calibrate passes its
    input through, which a dynamic quantizer (quantizing each forward as deployed) does not."""
    return not any(isinstance(q, TensorQuantizer) and q.spec.dynamic and q.mode != "disabled"
                   for q in prepared.modules())


def _distributed_skip(name: str, setting: object, report: PrepareReport, warn: bool) -> None:
    """Under distributed calibration a pass that decides from data would change the ranks' models differently:
    True raises, "auto" skips with a report note (and a warning where ``warn``)."""
    why = f"{name} decides from each rank's own calibration batches, so the ranks would change their models differently"
    fix = (f"calibrate on one rank (fxquant.calibrate(..., distributed=False) under `if rank == 0`) to run it, or "
           f"set QuantConfig({name}=False)")
    if setting is True:
        raise ConfigError(f"QuantConfig({name}=True) under distributed calibration: {why}; {fix}")
    note = f"{name} skipped under distributed calibration: {why}; {fix}"
    report.skipped.append(note)
    if warn:
        warnings.warn(note, stacklevel=4)


def before_calibrate(prepared: nn.Module, batches: Iterable, config: QuantConfig, report: PrepareReport,
                     run: Forward, distributed: bool = False) -> OutlierWatch | None:
    """SmoothQuant, then the outlier-channel split, on the calibration batches, before ranges are calibrated
    (each once per prepared model), each batch through ``run``. "auto" reports a pass only where it changed
    something. Under distributed calibration they would decide from each rank's own batches and change the
    ranks' models differently: "auto" skips them (with a report note; SmoothQuant, whose trigger means a
    transformer that loses accuracy without it, also warns; the split's (any Linear) fits every CNN head, where a
    warning would be noise), True raises.

    The split decides on float activations: where calibrate's own pass runs the float model (``float_pass``),
    it does not run them here but returns an ``OutlierWatch`` for calibrate to fill during its pass and apply
    with ``after_pass`` (a second pass then runs only where it split something); otherwise it runs here."""
    if smooths(prepared, config, report):
        if distributed:
            _distributed_skip("smoothquant", config.smoothquant, report, warn=True)
        else:
            _record(report, "smoothquant", config.smoothquant, smoothquant(prepared, batches, run))
    if not splits(prepared, config, report):
        return None
    if distributed:
        _distributed_skip("outlier_channels", config.outlier_channels, report, warn=False)
        return None
    if float_pass(prepared):
        return OutlierWatch(prepared)
    _record(report, "outlier_channels", config.outlier_channels, split_outlier_channels(prepared, batches, run))
    return None


def after_pass(watch: OutlierWatch | None, config: QuantConfig, report: PrepareReport) -> bool:
    """Apply the outlier split decided on the rows calibrate's pass collected for ``watch``; True when it changed
    the model (calibrate then collects its statistics again)."""
    if watch is None:
        return False
    result = watch.split()
    _record(report, "outlier_channels", config.outlier_channels, result)
    return bool(result.done)


def _record(report: PrepareReport, name: str, setting: object, result: PTQReport) -> None:
    if result.done or setting is True:
        report.ptq[name] = result


def after_calibrate(prepared: fx.GraphModule, batches: list, config: QuantConfig, progress: bool) -> None:
    """AdaRound, then bias correction, as the config asks (both need calibrated ranges)."""
    if config.adaround_options is not None:
        adaround(prepared, batches, config.adaround_options, progress=progress)
    method = config.bias_correction_method
    if method is not None:
        correct_bias(prepared, batches if method == "empirical" else None, method, progress=progress)
