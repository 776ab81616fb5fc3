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
benchmark's): see docs/ptq.md. Means are taken over a sample of about ``POSITIONS`` input positions per forward
(whole image rows: every k-th row of every m-th image, the grid shifted on every forward); the taps
then cost about 1 % of a ResNet-50 forward. Padded positions of a padding-masked batch count like real ones.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.ptq.layers import Layer, conv_args, hook_inputs, input_taps, pair, quantized_layers
from fxquant.report import PTQReport
from fxquant.state import get_state

POSITIONS = 1 << 11  # input positions per forward averaged (a sample of whole rows spread over the batch)


class InputMeans:
    """The layers corrected, where their inputs are read, and the running per-channel sums of those inputs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.taps, skipped = input_taps(gm, _unsupported, lambda why: f"bias not corrected ({why})")
        self.report = PTQReport("bias_correction", skipped=skipped,
                                data={"method": "input_means", "max_shift": {}, "bias_shifts": {}})
        self.layers = [layer for _, _, layer in self.taps]
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}

    def hooks(self) -> list:
        """Register the taps; returns the handles."""
        return hook_inputs(self.taps, self.add)

    def add(self, layer: Layer, x: torch.Tensor) -> None:
        x = x.detach()
        calls = self.calls[layer.name] = self.calls.get(layer.name, 0) + 1
        if layer.kind == "conv":  # (N, C, H, W): every sh-th row of every sn-th image, about POSITIONS in all
            self.sizes[layer.name] = tuple(x.shape[-2:])
            n, _, h, w = x.shape
            rows = -(-POSITIONS // w)
            sh = min(h, max(1, n * h // rows))
            sn = max(1, n // max(1, rows // -(-h // sh)))
            shift = _shift(calls)
            sample = x[int(shift * sn)::sn, :, int(shift * sh)::sh]
            total, count = sample.sum((0, 2, 3)), sample.numel() // x.shape[1]
        else:
            rows = x.reshape(-1, x.shape[-1])
            step = max(1, rows.shape[0] // POSITIONS)
            picked = rows[int(_shift(calls) * step)::step]
            total, count = picked.sum(0), picked.shape[0]
        total = total.double()
        self.sums[layer.name] = self.sums[layer.name] + total if layer.name in self.sums else total
        self.counts[layer.name] = self.counts.get(layer.name, 0) + count

    @torch.no_grad()
    def correct(self) -> PTQReport:
        """Subtract ``dW E[x]`` from every tapped layer's bias (with the weights as they are now: after the
        weight widths, GPTQ or AdaRound); the report."""
        for layer in self.layers:
            if layer.name not in self.sums:
                self.report.skipped.append(f"`{layer.name}`: bias not corrected (no calibration batch reached it)")
                continue
            mean = self.sums[layer.name] / self.counts[layer.name]
            shift = weight_shift(layer, mean, self.sizes.get(layer.name))
            if bool(shift.abs().max() > 0):
                subtract_shift(layer, shift, self.report)
        return self.report


@torch.no_grad()
def subtract_shift(layer: Layer, shift: torch.Tensor, report: PTQReport) -> None:
    """``bias -= shift`` (a bias of zeros created where the layer has none), recorded in ``report``: a line, the
    largest magnitude (``data["max_shift"]``) and the shift itself (``data["bias_shifts"]``, which
    ``fxquant.save_encodings`` keeps, the biases being part of the calibration)."""
    bias = layer.ensure_bias()
    bias.sub_(shift.to(bias.dtype))
    largest = report.data.setdefault("max_shift", {})[layer.name] = float(shift.abs().max())
    report.data.setdefault("bias_shifts", {})[layer.name] = shift.to(bias.dtype).tolist()
    report.done.append(f"`{layer.name}`: bias corrected by up to {largest:.3g}")


def shifted_layers(model: nn.Module) -> list[tuple[Layer, torch.Tensor]]:
    """Each quantized layer of a prepared ``model`` whose bias calibrate()'s bias correction shifted, with the shift
    (float64, as ``report_of(model).ptq["bias_correction"].data["bias_shifts"]`` records it)."""
    state = get_state(model)
    report = state.report.ptq.get("bias_correction") if state is not None else None
    shifts = report.data.get("bias_shifts", {}) if report is not None else {}
    layers = {layer.name: layer for layer in quantized_layers(model, calibrated=False)[0]} if shifts else {}
    return [(layers[name], torch.tensor(shift, dtype=torch.float64)) for name, shift in shifts.items()
            if name in layers]


def weight_shift(layer: Layer, mean: torch.Tensor, size: tuple[int, ...] | None) -> torch.Tensor:
    """The mean output shift ``dW E[x]`` of ``layer`` for per-channel input means ``mean`` (a Conv2d's over
    inputs of spatial ``size``), in float64."""
    weight = layer.weight.detach()
    error = layer.quantizer(weight) - weight
    if layer.kind == "linear":
        return error.double() @ mean
    # conv(mean image, dW) averaged over output positions: each kernel tap weighs by the share of output
    # positions where it reads inside the input (zero padding at the borders), one share per axis
    stride, padding, dilation = (pair(a) for a in conv_args(layer))
    share = [_inside(n, k, s, p, d) for n, k, s, p, d in zip(size, error.shape[2:], stride, padding, dilation,
                                                             strict=True)]
    per_tap = torch.outer(*share).float()
    error = torch.einsum("ocij,ij->oc", error, per_tap).double()  # (out, in per group)
    groups = layer.groups
    out, per_group = error.shape
    grouped = error.reshape(groups, out // groups, per_group)
    return torch.einsum("goc,gc->go", grouped, mean.reshape(groups, per_group)).reshape(out)


def _inside(size: int, kernel: int, stride: int, padding: int | str, dilation: int) -> torch.Tensor:
    """Per kernel tap along one axis: the share of output positions at which it reads inside the input."""
    if padding == "same":  # torch pads (kernel - 1) * dilation, the smaller half first; stride 1
        left, length = dilation * (kernel - 1) // 2, size
    else:
        left = 0 if padding == "valid" else padding
        length = (size + 2 * left - dilation * (kernel - 1) - 1) // stride + 1
    at = (torch.arange(length, dtype=torch.float64) * stride - left).unsqueeze(0) \
        + (torch.arange(kernel, dtype=torch.float64) * dilation).unsqueeze(1)
    return ((at >= 0) & (at < size)).double().mean(1)


def _unsupported(layer: Layer) -> str | None:
    if layer.kind == "linear":
        return None
    if layer.kind != "conv" or layer.weight.dim() != 4:
        return f"a {layer.kind} of {layer.weight.dim()}-D weight (input means cover Linear and Conv2d)"
    if getattr(layer.module, "padding_mode", "zeros") != "zeros":
        return f"a conv that pads with {layer.module.padding_mode!r}"
    return None


def _shift(calls: int) -> float:
    """Where in [0, 1) of a sampling step the ``calls``-th forward starts: the golden-ratio sequence, so that
    successive batches read rows the earlier ones skipped."""
    return (calls * 0.6180339887498949) % 1.0
