"""Bias correction: cancel the mean output error that weight quantization adds (Nagel et al. 2019, section 4.2;
the Google quantization white paper, section 3.4).

A quantized weight W + dW shifts a layer's output mean by dW E[x]. Each quantized layer's bias absorbs
minus that shift:

- ``empirical``: on calibration data, the per-channel output mean of the float model minus that of the
  quantized model (inputs quantized, earlier layers already corrected), layer by layer in graph order;
- ``analytical``: from BatchNorm statistics alone, no data: when the layer's input is ReLU(y) (or y) with
  y ~ N(beta, gamma) per channel read from the folded BatchNorm of the layer before, E[x] is known in closed
  form, and the correction is -dW E[x]. Layers whose input distribution is unknown are skipped with the reason;
- ``input_means``: -dW E[x] with E[x] measured on the calibration data (``fxquant.ptq.input_means``), during
  calibrate's ranges pass.

``QuantConfig(bias_correction="auto")``, the default, runs the backend's ``bias_correction`` (``input_means`` on
ONNX Runtime) only where it costs no pass of its own: calibrate's ranges pass runs one traced graph in float, in
one process (not across torch.distributed ranks), and neither AdaRound nor GPTQ, which compensate the rounding
themselves (measured: GPTQ + input means 18.1 dB vs GPTQ 18.2 dB on EfficientNet-Lite0, 16.2 vs 17.3 dB on the
digits MobileNet at W4). ``prepare_qat`` turns "auto" off: training moves the biases itself.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.capture.trace import normalize_inputs
from fxquant.errors import CalibrationError, ConfigError, ConfigTypeError
from fxquant.passes.manager import PassResult
from fxquant.provenance import ExpectedInput, info, read
from fxquant.ptq.bn_stats import bn_stats
from fxquant.ptq.chains import find_chains, input_response
from fxquant.ptq.input_means import InputMeans, subtract_shift
from fxquant.ptq.layers import channel_sum, float_mode, layer_activations, quantized_layers
from fxquant.ptq.step import CalibrationContext, StepResult
from fxquant.report import PTQReport
from fxquant.spec import BIAS_CORRECTION_METHODS
from fxquant.state import get_state


def relu_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[ReLU(y)] for y ~ N(mean, std^2): mean * Phi(mean/std) + std * phi(mean/std) (std 0: ReLU(mean))."""
    safe = std.clamp_min(1e-12)
    z = mean / safe
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return torch.where(std > 0, mean * cdf + safe * pdf, mean.clamp_min(0.0))


def record_expected_inputs(gm: fx.GraphModule) -> PassResult:
    """Before quantizers go in: store E[input channel] on each layer whose input comes from a folded
    Conv/Linear -> BatchNorm through ReLU / identity / average pooling / flatten (``info(node).expected_input``),
    or the reason it is unknown. The graph is unchanged."""
    chains, _ = find_chains(gm)
    for link in (link for chain in chains for link in chain.links):
        stats = bn_stats(link.a)
        record = info(link.b)
        if stats is None:
            record.expected_input = (f"`{link.a.target}` has no folded BatchNorm, so its output distribution is "
                                     "unknown")
        elif "max_pool" in link.kinds:
            record.expected_input = ("max pooling between the layers changes the mean in a way BN statistics "
                                     "cannot tell")
        else:
            expected = relu_normal_mean(stats.mean, stats.std) if link.through_relu else stats.mean
            record.expected_input = ExpectedInput(expected.clone(), link.repeat)
    return PassResult(gm, modified=False)


def correct_layer_biases(prepared: fx.GraphModule, batches=None, method: str = "empirical",
                         progress: bool = True) -> PTQReport:
    """Correct the biases of a calibrated ``prepared`` model in place (``method``: "empirical" or "input_means"
    with ``batches``, or "analytical" from BatchNorm statistics); returns the report."""
    if method not in BIAS_CORRECTION_METHODS:
        raise ConfigError(f"unknown bias correction method {method!r}; valid: {list(BIAS_CORRECTION_METHODS)}")
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("correct_bias() needs a model that fxquant.calibrate() has run on")
    if method != "analytical" and (batches is None or isinstance(batches, torch.Tensor)):
        raise ConfigTypeError(f"{method} bias correction needs batches: an iterable of calibration batches")
    if method == "input_means":
        return _input_means(prepared, batches)
    report = PTQReport("bias_correction", data={"method": method, "max_shift": {}, "bias_shifts": {}})
    layers, notes = quantized_layers(prepared)
    report.skipped += notes
    was_training = prepared.training
    prepared.eval()
    try:
        if method == "empirical":
            batches = list(batches)
            if not batches:
                raise ConfigError("empirical bias correction needs at least one batch")
            with float_mode(prepared):  # the float model's means, before any bias changes
                targets = {}
                for layer in layers:
                    parts = layer_activations(prepared, layer, batches, "output",
                                              reduce=channel_sum(layer.channel_dim))
                    targets[layer.name] = sum(s for s, _ in parts) / sum(c for _, c in parts)
            for layer in tqdm(layers, desc="fxquant bias correction", unit="layer", disable=not progress):
                parts = layer_activations(prepared, layer, batches, "output", reduce=channel_sum(layer.channel_dim))
                shift = sum(s for s, _ in parts) / sum(c for _, c in parts) - targets[layer.name]
                subtract_shift(layer, shift, report)
        else:
            for layer in layers:
                expected = read(layer.node).expected_input if layer.node is not None else None
                if not isinstance(expected, ExpectedInput):
                    report.skipped.append(f"`{layer.name}`: " + (expected or "its input does not come from a folded "
                                                                 "Conv/Linear -> BatchNorm (-> ReLU)"))
                    continue
                with torch.no_grad():
                    error = layer.quantizer(layer.weight) - layer.weight
                    shift = input_response(layer, expected.mean, expected.repeat, weight=error)
                subtract_shift(layer, shift.double(), report)
    finally:
        prepared.train(was_training)
    return report


def _input_means(prepared: nn.Module, batches) -> PTQReport:
    """The ``input_means`` correction on its own float pass over ``batches`` (outside calibrate's ranges pass)."""
    if not isinstance(prepared, fx.GraphModule):
        raise ConfigError("bias_correction='input_means' needs a model traced as one graph; use 'empirical'")
    watch = InputMeans(prepared)
    handles = watch.hooks()
    was_training = prepared.training
    prepared.eval()  # dropout off, as in calibrate's ranges pass
    try:
        with torch.no_grad(), float_mode(prepared):
            for batch in batches:
                prepared(*normalize_inputs(batch))
    finally:
        for h in handles:
            h.remove()
        prepared.train(was_training)
    return watch.correct()


def method_in_force(ctx: CalibrationContext) -> str | None:
    """The correction calibrate runs: the config's method, or for "auto" the backend's where it is free (a tap
    on the ranges pass of one traced graph run in float; not with AdaRound)."""
    method = ctx.config.bias_correction_method
    if method != "auto":
        return method
    fits_itself = ctx.config.adaround_options is not None or ctx.config.gptq  # they compensate the rounding
    if ctx.backend.bias_correction != "input_means" or fits_itself or ctx.distributed:
        return None
    return "input_means" if _can_tap(ctx) or "bias_correction" in ctx.watches else None


def _can_tap(ctx: CalibrationContext) -> bool:
    return ctx.float_pass and isinstance(ctx.model, fx.GraphModule)


def watches_input_means(ctx: CalibrationContext) -> bool:
    """Whether the ``input_means`` correction taps calibrate's ranges pass (which must run the float model)."""
    return method_in_force(ctx) == "input_means" and _can_tap(ctx)


def input_means_watch_step(ctx: CalibrationContext) -> StepResult:
    """Before the ranges: tap every Conv2d/Linear input for its channel means."""
    watch = InputMeans(ctx.model)
    for handle in watch.hooks():
        ctx.hooks.callback(handle.remove)
    ctx.watches["bias_correction"] = watch
    return StepResult()


def corrects_bias(ctx: CalibrationContext) -> bool:
    """Whether calibrate() corrects biases: ``QuantConfig(bias_correction=...)`` asks for it (or "auto" chose it)."""
    return method_in_force(ctx) is not None


def corrects_empirically(ctx: CalibrationContext) -> bool:
    """Whether bias correction reads the calibration batches: the empirical method, and input_means where it
    could not tap the ranges pass (analytical needs none)."""
    method = method_in_force(ctx)
    return method == "empirical" or (method == "input_means" and not watches_input_means(ctx))


def bias_correction_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s bias correction step, the last (``fxquant.ptq.step``)."""
    method = method_in_force(ctx)
    if method == "input_means":
        watch = ctx.watches.pop("bias_correction", None)
        if watch is not None:
            return StepResult(watch.correct())
        if ctx.distributed:  # its watch step was skipped on the ranks, with the note that says why
            return StepResult()
    return StepResult(correct_layer_biases(ctx.model, ctx.batches if method != "analytical" else None, method,
                                           ctx.progress))
