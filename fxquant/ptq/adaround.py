"""AdaRound as a calibrate step: learn the rounding of every quantized weight of a calibrated model.

AdaRound's rounding variables (``fxquant.ptq.rounding``), fitted block by block with activation quantization in
the loop (``fxquant.ptq.reconstruct``; ``AdaRoundOptions.granularity="layer"`` fits one layer at a time, as the
AdaRound paper does). Export reproduces the learned codes exactly: the float weight becomes ``s * q``, so
round-to-nearest with the unchanged scale gives ``q`` back; calibrate() leaves these weight ranges alone afterwards
(``StepResult.fixed_weights``).
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch import fx, nn

from fxquant.errors import CalibrationError, ConfigError, ConfigTypeError
from fxquant.ptq.layers import Layer, quantized_layers
from fxquant.ptq.reconstruct import reconstruct, take_samples
from fxquant.ptq.step import CalibrationContext, StepResult
from fxquant.report import PTQReport
from fxquant.spec import AdaRoundOptions
from fxquant.state import get_state


def learn_rounding(prepared: nn.Module, batches, options: AdaRoundOptions | None = None,
                   progress: bool = True) -> StepResult:
    """Learn the rounding of every quantized weight of a calibrated ``prepared`` model, in place.

    ``batches``: calibration batches (model inputs), read once up to ``options.num_samples`` samples. The report
    holds per block its output MSE with nearest and with learned rounding and its time (``data['blocks']``), and
    each layer's integer codes (``data['codes']``); the rounded layers' weight quantizers are ``fixed_weights``.
    """
    options = AdaRoundOptions() if options is None else options
    if not isinstance(options, AdaRoundOptions):
        raise ConfigTypeError(f"options must be an AdaRoundOptions, got {type(options).__name__}")
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("adaround() needs a model that fxquant.calibrate() has run on (weights and "
                               "activations need ranges first)")
    if batches is None or not hasattr(batches, "__iter__") or isinstance(batches, torch.Tensor):
        raise ConfigTypeError("batches must be an iterable of batches, not a single tensor; wrap it: [tensor]")
    start = time.perf_counter()
    report = PTQReport("adaround")
    if not isinstance(prepared, fx.GraphModule):
        report.skipped.append("the model is not one traced graph (parts of it run eagerly), and reconstruction runs "
                              "on a traced graph: its weights keep round-to-nearest")
        return StepResult(report)
    layers, notes = quantized_layers(prepared)
    report.skipped += notes
    layers = _learnable(prepared, layers, report)
    samples, notes = take_samples(batches, options.num_samples)
    report.skipped += notes
    if not samples:
        raise ConfigError("adaround() needs at least one calibration batch")
    was_training = prepared.training
    prepared.eval()
    try:
        codes = reconstruct(prepared, layers, samples, options, report, progress)
    finally:
        prepared.train(was_training)
    report.data.update({"codes": codes, "options": options, "samples": int(samples[0].shape[0]),
                        "seconds": time.perf_counter() - start})
    return StepResult(report, fixed_weights={layer.quantizer_path or f"{layer.name}.weight_quantizer"
                                             for layer in layers if layer.name in codes})


def rounds(ctx: CalibrationContext) -> bool:
    """Whether calibrate() runs AdaRound: ``QuantConfig(adaround=...)`` asks for it."""
    return ctx.config.adaround_options is not None


def adaround_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s AdaRound step, on its batches (``fxquant.ptq.step``)."""
    return learn_rounding(ctx.model, ctx.batches, ctx.config.adaround_options, ctx.progress)


def _learnable(gm: fx.GraphModule, layers: list[Layer], report: PTQReport) -> list[Layer]:
    """The layers whose rounding can be learned: symmetric weights, one call site."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    kept = []
    for layer in layers:
        if not layer.quantizer.spec.symmetric:
            report.skipped.append(f"`{layer.name}`: affine weight quantization (zero point) is not supported")
        elif layer.module is not None and calls[layer.name] > 1:
            report.skipped.append(f"`{layer.name}`: called at {calls[layer.name]} places; its weights keep "
                                  "round-to-nearest")
        else:
            kept.append(layer)
    return kept
