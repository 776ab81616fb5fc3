"""Bias correction: cancel the mean output error that weight quantization adds (Nagel et al. 2019, section 4.2;
the Google quantization white paper, section 3.4).

A quantized weight W + dW shifts a layer's output mean by dW E[x]. Each quantized layer's bias absorbs
minus that shift:

- ``empirical``: on calibration data, the per-channel output mean of the float model minus that of the
  quantized model (inputs quantized, earlier layers already corrected), layer by layer in graph order;
- ``analytical``: from BatchNorm statistics alone, no data: when the layer's input is ReLU(y) (or y) with
  y ~ N(beta, gamma) per channel read from the folded BatchNorm of the layer before, E[x] is known in closed
  form, and the correction is -dW E[x]. Layers whose input distribution is unknown are skipped with the reason.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from tqdm.auto import tqdm

from fxquant.errors import CalibrationError, ConfigError, ConfigTypeError
from fxquant.passes.manager import PassResult
from fxquant.provenance import ExpectedInput, info, read
from fxquant.ptq.bn_stats import bn_stats
from fxquant.ptq.chains import find_chains, input_response
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
    """Correct the biases of a calibrated ``prepared`` model in place (``method``: "empirical" with
    ``batches``, or "analytical" from BatchNorm statistics); returns the report."""
    if method not in BIAS_CORRECTION_METHODS:
        raise ConfigError(f"unknown bias correction method {method!r}; valid: {list(BIAS_CORRECTION_METHODS)}")
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("correct_bias() needs a model that fxquant.calibrate() has run on")
    report = PTQReport("bias_correction")
    layers, notes = quantized_layers(prepared)
    report.skipped += notes
    shifts: dict[str, float] = {}
    was_training = prepared.training
    prepared.eval()
    try:
        if method == "empirical":
            if batches is None or isinstance(batches, torch.Tensor):
                raise ConfigTypeError("empirical bias correction needs batches: an iterable of calibration batches")
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
                _apply(layer, shift, report, shifts)
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
                _apply(layer, shift.double(), report, shifts)
    finally:
        prepared.train(was_training)
    report.data = {"method": method, "max_shift": shifts}
    return report


def corrects_bias(ctx: CalibrationContext) -> bool:
    """Whether calibrate() corrects biases: ``QuantConfig(bias_correction=...)`` asks for it."""
    return ctx.config.bias_correction_method is not None


def corrects_empirically(ctx: CalibrationContext) -> bool:
    """Whether bias correction reads the calibration batches (the empirical method; analytical needs none)."""
    return ctx.config.bias_correction_method == "empirical"


def bias_correction_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s bias correction step, the last (``fxquant.ptq.step``)."""
    method = ctx.config.bias_correction_method
    return StepResult(correct_layer_biases(ctx.model, ctx.batches if method == "empirical" else None, method,
                                           ctx.progress))


@torch.no_grad()
def _apply(layer, shift: torch.Tensor, report: PTQReport, shifts: dict) -> None:
    bias = layer.ensure_bias()
    bias.sub_(shift.to(bias.dtype))
    shifts[layer.name] = float(shift.abs().max())
    report.done.append(f"`{layer.name}`: bias corrected by up to {shifts[layer.name]:.3g}")
