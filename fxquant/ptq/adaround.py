"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Layer by layer in graph order, each weight is rounded down or up (instead of to nearest) as learned by
minimizing ||f(W x_float) - f(W_soft x_quant)||^2 over calibration data, where x_quant is the layer's input
in the quantized model (earlier layers already rounded), f is the following ReLU when there is one, and
W_soft = s * clamp(floor(W/s) + h(V), qmin, qmax) with the rectified sigmoid h. A regularizer with an annealed
exponent drives every h(V) to 0 or 1.

Export reproduces the learned codes exactly: the float weight is replaced by s * q, so round-to-nearest
with the unchanged scale s (QuantizeLinear in ONNX, the fake quantizer in torch) gives back q; calibrate()
leaves these weight ranges alone afterwards (``QuantState.fixed_weights``).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant import qmath
from fxquant.errors import CalibrationError, ConfigError, ConfigTypeError
from fxquant.ptq.layers import Layer, float_mode, followed_by_relu, layer_activations, quantized_layers
from fxquant.ptq.step import CalibrationContext, StepResult
from fxquant.report import PTQReport
from fxquant.spec import AdaRoundOptions
from fxquant.state import get_state

ZETA, GAMMA = 1.1, -0.1


class SoftRounding(nn.Module):
    """Stands in for a weight quantizer during AdaRound: ignores its input and returns the soft-rounded weight."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        scaled = weight.detach() / scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(0.0, 1.0)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))  # h(V) == rest at the start
        self.qmin, self.qmax = qmin, qmax

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.clamp(self.floor + self.h(), self.qmin, self.qmax)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.V >= 0).float(), self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


def _check(prepared: nn.Module, batches: object) -> list:
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("adaround() needs a model that fxquant.calibrate() has run on (weights and "
                               "activations need ranges first)")
    if isinstance(batches, torch.Tensor):
        raise ConfigTypeError("batches must be an iterable of batches, not a single tensor; wrap it: [tensor]")
    batches = list(batches)
    if not batches:
        raise ConfigError("adaround() needs at least one calibration batch")
    return batches


def learn_rounding(prepared: fx.GraphModule, batches, options: AdaRoundOptions | None = None,
                   progress: bool = True) -> StepResult:
    """Learn the rounding of every quantized weight of a calibrated ``prepared`` model, in place (``batches`` is
    re-read once per layer: a list is best). The report's ``data['codes']`` holds each layer's integer codes; the
    rounded layers' weight quantizers are the result's ``fixed_weights``."""
    options = AdaRoundOptions() if options is None else options
    if not isinstance(options, AdaRoundOptions):
        raise ConfigTypeError(f"options must be an AdaRoundOptions, got {type(options).__name__}")
    batches = _check(prepared, batches)
    report = PTQReport("adaround")
    layers, notes = quantized_layers(prepared)
    report.skipped += notes
    codes: dict[str, torch.Tensor] = {}
    losses: dict[str, dict[str, float]] = {}
    originals = {layer.name: layer.weight.detach().clone() for layer in layers}
    was_training = prepared.training
    prepared.eval()
    try:
        for layer in tqdm(layers, desc="fxquant adaround", unit="layer", disable=not progress):
            spec = layer.quantizer.spec
            if not spec.symmetric:
                report.skipped.append(f"`{layer.name}`: affine weight quantization (zero point) is not supported")
                continue
            result = _round_layer(prepared, layer, batches, options, progress, layers, originals)
            codes[layer.name] = result.pop("codes")
            losses[layer.name] = result
            report.done.append(f"`{layer.name}`: output MSE {result['mse_nearest']:.3g} (nearest) -> "
                               f"{result['mse_adaround']:.3g}; {result['flipped'] * 100:.1f}% of weights rounded "
                               "the other way")
    finally:
        prepared.train(was_training)
    report.data = {"codes": codes, "layers": losses, "options": options}
    return StepResult(report, fixed_weights={layer.quantizer_path or f"{layer.name}.weight_quantizer"
                                             for layer in layers if layer.name in codes})


def rounds(ctx: CalibrationContext) -> bool:
    """Whether calibrate() runs AdaRound: ``QuantConfig(adaround=...)`` asks for it."""
    return ctx.config.adaround_options is not None


def adaround_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s AdaRound step, on its batches (``fxquant.ptq.step``)."""
    return learn_rounding(ctx.model, ctx.batches, ctx.config.adaround_options, ctx.progress)


def _round_layer(model: fx.GraphModule, layer: Layer, batches: list, options: AdaRoundOptions,
                 progress: bool, layers: list[Layer], originals: dict[str, torch.Tensor]) -> dict:
    quantizer = layer.quantizer
    with float_mode(model), original_weights(layers, originals):  # the target is the float model's output
        targets = torch.cat(layer_activations(model, layer, batches, "output", options.num_samples))
    inputs = torch.cat(layer_activations(model, layer, batches, "input", options.num_samples))
    act = torch.relu if followed_by_relu(model, layer.node) else (lambda t: t)
    targets = act(targets)
    weight = layer.weight.detach()
    axis = quantizer._axis(weight)
    scale = qmath.along_axis(quantizer.scale.detach().to(weight.device), weight.dim(), axis).expand_as(weight).clone()
    spec = quantizer.spec
    soft = SoftRounding(weight, scale, spec.qmin, spec.qmax).to(weight.device)
    with torch.no_grad():
        nearest = qmath.quantize(weight, scale, 0.0, spec.qmin, spec.qmax)
        mse_nearest = _mse(layer, inputs, targets, act)
    layer.quantizer = soft
    try:
        q = _optimize(layer, soft, inputs, targets, act, options, progress)
    finally:
        layer.quantizer = quantizer
    with torch.no_grad():
        layer.weight.copy_((scale * q).to(layer.weight.dtype))  # round-to-nearest with scale s gives q back
        mse_adaround = _mse(layer, inputs, targets, act)
    return {"codes": q.to(torch.int8) if spec.num_bits <= 8 else q.to(torch.int32),
            "mse_nearest": mse_nearest, "mse_adaround": mse_adaround,
            "flipped": float((q != nearest).float().mean())}


@torch.enable_grad()  # calibrate() runs under no_grad
def _optimize(layer: Layer, soft: SoftRounding, inputs: torch.Tensor, targets: torch.Tensor, act,
              options: AdaRoundOptions, progress: bool) -> torch.Tensor:
    """Adam on the rounding variables; returns the hard codes."""
    generator = torch.Generator().manual_seed(options.seed)
    opt = torch.optim.Adam([soft.V], lr=options.lr)
    warm = int(options.warm_up * options.iterations)
    batch = min(options.batch_size, inputs.shape[0])
    for it in tqdm(range(options.iterations), desc=f"  {layer.name}", leave=False, disable=not progress):
        idx = torch.randint(0, inputs.shape[0], (batch,), generator=generator)
        loss = (act(layer(inputs[idx])) - targets[idx]).pow(2).sum(layer.channel_dim).mean()
        if it >= warm:
            share = (it - warm) / max(options.iterations - warm, 1)
            beta = options.beta_start + (options.beta_end - options.beta_start) * share
            loss = loss + options.reg_weight * soft.regularizer(beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return soft.codes().detach()


@contextlib.contextmanager
def original_weights(layers: list[Layer], originals: dict[str, torch.Tensor]):
    """Temporarily put the float weights back into layers that were already rounded."""
    current = {layer.name: layer.weight.detach().clone() for layer in layers}
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(originals[layer.name])
    try:
        yield
    finally:
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(current[layer.name])


@torch.no_grad()
def _mse(layer: Layer, inputs: torch.Tensor, targets: torch.Tensor, act) -> float:
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], 256):
        out = act(layer(inputs[i:i + 256]))
        total += float((out - targets[i:i + 256]).pow(2).sum())
        count += out.numel()
    return total / max(count, 1) if not math.isnan(total) else math.nan
