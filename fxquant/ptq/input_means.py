"""Bias correction from the calibration inputs' channel means (``QuantConfig(bias_correction="input_means")``).

A quantized weight ``W + dW`` shifts a layer's mean output by ``dW E[x]`` (Nagel et al. 2019, section 4.2). The
``analytical`` method reads ``E[x]`` from BatchNorm statistics and must skip every layer whose input is not a
folded BatchNorm through ReLU (ReLU6, residual adds, pooling, the model input); the ``empirical`` method measures
each layer's output mean on the quantized model, layer by layer, at the cost of a forward per layer. This one
reads ``E[x]`` of every Conv2d and Linear input from the calibration data itself, per input channel, during
calibrate's ranges pass (hooks; no forward of its own), and subtracts from each bias

* Linear: ``dW @ E[x]``;
* Conv2d: the mean over output positions of ``conv(E[x] * 1, dW)``: an input of each channel's mean at every
  position, so the zero padding at the borders counts as the real convolution counts it.

It corrects what weight rounding shifts, not what activation quantization shifts (the ``empirical`` method's
remainder). Measured on the pretrained EfficientNet-Lite0 (``onnxruntime`` preset, other crops than the
benchmark's): see docs/ptq.md. Means are taken over a strided subset of positions (every k-th image row, about
``MAX_ROWS`` positions per forward); padded positions of a padding-masked batch count like real ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.ptq.layers import Layer, conv_args, hook_inputs, input_taps
from fxquant.report import PTQReport

MAX_ROWS = 1 << 14  # input positions per forward averaged at most (a strided subset over the batch)


class InputMeans:
    """The layers corrected, where their inputs are read, and the running per-channel sums of those inputs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.taps, skipped = input_taps(gm, _unsupported, lambda why: f"bias not corrected ({why})")
        self.report = PTQReport("bias_correction", skipped=skipped, data={"method": "input_means"})
        self.layers = [layer for _, _, layer in self.taps]
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, ...]] = {}

    def hooks(self) -> list:
        """Register the taps; returns the handles."""
        return hook_inputs(self.taps, self.add)

    def add(self, layer: Layer, x: torch.Tensor) -> None:
        x = x.detach()
        if layer.kind == "conv":  # (N, C, H, W): every step-th row of each image, no copy
            self.sizes[layer.name] = tuple(x.shape[-2:])
            step = max(1, x.shape[0] * x.shape[2] * x.shape[3] // MAX_ROWS // x.shape[3])
            sample = x[:, :, ::step]
            total, count = sample.sum((0, 2, 3)), sample.numel() // x.shape[1]
        else:
            rows = x.reshape(-1, x.shape[-1])
            sample = rows[::max(1, rows.shape[0] // MAX_ROWS)]
            total, count = sample.sum(0), sample.shape[0]
        total = total.double()
        self.sums[layer.name] = self.sums[layer.name] + total if layer.name in self.sums else total
        self.counts[layer.name] = self.counts.get(layer.name, 0) + count

    @torch.no_grad()
    def correct(self) -> PTQReport:
        """Subtract ``dW E[x]`` from every tapped layer's bias (with the weights as they are now: after the
        weight widths, GPTQ or AdaRound); the report."""
        shifts: dict[str, float] = {}
        for layer in self.layers:
            if layer.name not in self.sums:
                self.report.skipped.append(f"`{layer.name}`: bias not corrected (no calibration batch reached it)")
                continue
            mean = self.sums[layer.name] / self.counts[layer.name]
            shift = weight_shift(layer, mean, self.sizes.get(layer.name))
            if not bool(shift.abs().max() > 0):
                continue
            bias = layer.ensure_bias()
            bias.sub_(shift.to(bias.dtype))
            shifts[layer.name] = float(shift.abs().max())
            self.report.done.append(f"`{layer.name}`: bias corrected by up to {shifts[layer.name]:.3g}")
        self.report.data["max_shift"] = shifts
        return self.report


def weight_shift(layer: Layer, mean: torch.Tensor, size: tuple[int, ...] | None) -> torch.Tensor:
    """The mean output shift ``dW E[x]`` of ``layer`` for per-channel input means ``mean`` (a Conv2d's over
    inputs of spatial ``size``), in float64."""
    weight = layer.weight.detach()
    error = (layer.quantizer(weight) - weight).double()
    if layer.kind == "linear":
        return error @ mean
    stride, padding, dilation = conv_args(layer)
    image = mean.reshape(1, -1, 1, 1).expand(1, mean.numel(), *size)
    return F.conv2d(image, error, None, stride, padding, dilation, layer.groups).mean((0, 2, 3))


def _unsupported(layer: Layer) -> str | None:
    if layer.kind == "linear":
        return None
    if layer.kind != "conv" or layer.weight.dim() != 4:
        return f"a {layer.kind} of {layer.weight.dim()}-D weight (input means cover Linear and Conv2d)"
    if getattr(layer.module, "padding_mode", "zeros") != "zeros":
        return f"a conv that pads with {layer.module.padding_mode!r}"
    return None
