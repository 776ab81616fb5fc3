"""Where the PTQ passes run: which prepare passes a config adds, and what calibrate() runs afterwards."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import fx

from fxquant.passes.manager import PassResult
from fxquant.spec import QuantConfig


def before_fold(config: QuantConfig) -> list[tuple[str, Callable]]:
    """Passes that must see BatchNorm before folding deletes it."""
    from fxquant.ptq.bn_stats import record_bn_stats

    if config.equalize or config.absorb_bias or config.bias_correction_method == "analytical":
        return [("record_bn_stats", record_bn_stats)]
    return []


def after_fold(config: QuantConfig, example_inputs: object = None) -> list[tuple[str, Callable]]:
    """Data-free passes on the folded float graph, before quantizers go in (``example_inputs`` measure what
    ``equalize_relu6`` changes)."""
    from fxquant.ptq.bias_absorption import absorb_high_bias
    from fxquant.ptq.bias_correction import record_expected_inputs
    from fxquant.ptq.equalize import equalize

    passes: list[tuple[str, Callable]] = []
    if config.equalize:
        passes.append(("equalize", partial(equalize, relu6_as_relu=config.equalize_relu6,
                                           example_inputs=example_inputs)))
    if config.absorb_bias:
        passes.append(("bias_absorption", absorb_high_bias))
    if config.bias_correction_method == "analytical":
        def record(gm: fx.GraphModule) -> PassResult:
            record_expected_inputs(gm)
            return PassResult(gm, False)
        passes.append(("record_expected_inputs", record))
    return passes


def needs_data(config: QuantConfig) -> bool:
    """True when calibrate() re-reads its batches after calibration (so it keeps them in a list)."""
    return bool(config.adaround_options) or config.bias_correction_method == "empirical"


def after_calibrate(prepared: fx.GraphModule, batches: list, config: QuantConfig, progress: bool) -> None:
    """AdaRound, then bias correction, as the config asks (both need calibrated ranges)."""
    from fxquant.ptq.adaround import adaround
    from fxquant.ptq.bias_correction import correct_bias

    if config.adaround_options is not None:
        adaround(prepared, batches, config.adaround_options, progress=progress)
    method = config.bias_correction_method
    if method is not None:
        correct_bias(prepared, batches if method == "empirical" else None, method, progress=progress)
