"""Weight steps that let a quantized Conv/Gemm keep an int32 bias, so ONNX Runtime fuses it.

ONNX Runtime runs a QDQ Conv or Gemm as QLinearConv/QGemm only with its bias in int32 codes of step
``s_x * s_w[c]`` (input step times the output channel's weight step). A channel whose weights are all but zero (a
BatchNorm folded with gamma ~ 0: a "dead" channel, common in pretrained CNNs) gets a weight step of ~1e-9, and its
bias then needs more than 2^31 codes: export has to move that layer's bias into a float Add, and the Conv runs in
float (EfficientNet-Lite0: 22 of its 49 convolutions).

``widen_for_int32_bias`` raises the weight step of exactly those channels to the smallest one whose bias fits int32,
on the converted model, so torch and the ONNX model compute the same. What it costs: such a channel's weights are
under ``|b| / (s_x * 2^31)`` per step, so its output moves by less than ``|b| * 2^-23`` per product (with at most 255
input codes): far below the output's own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxquant.lower.frozen import FrozenQuantizer
from fxquant.ptq.layers import Layer, input_module, quantized_layers
from fxquant.quantizer import TensorQuantizer
from fxquant.report import PTQReport

INT32_MAX = 2**31 - 1
MARGIN = 1 + 2.0**-10  # float32 rounding of s_x * s_w and of the step itself
MAX_BITS = 8  # ORT fuses QLinearConv/QGemm for 8-bit inputs and weights only; wider ones keep a float bias
KINDS = ("conv", "linear")  # what export's int32_bias pass gives an int32 bias (Conv, Gemm)


@dataclass
class BiasSite:
    """A quantized layer with a bias: its name, its weight and input quantizers' names, and the bias."""

    layer: str
    weight_quantizer: str
    input_quantizer: str
    bias: torch.Tensor


def bias_sites(model: nn.Module) -> list[BiasSite]:
    """The 8-bit Conv/Linear layers of a calibrated model with a bias, a per-output-channel or per-tensor weight
    quantizer and a per-tensor input quantizer (the ones export gives an int32 bias)."""
    names = {id(m): n for n, m in model.named_modules()}
    sites = []
    layers, _ = quantized_layers(model)
    for layer in layers:
        wq, bias = layer.quantizer, layer.bias
        xq = _input_quantizer(model, layer)
        if (layer.kind not in KINDS or bias is None or xq is None or xq.spec.axis is not None or xq.spec.dynamic
                or max(wq.spec.num_bits, xq.spec.num_bits) > MAX_BITS or wq.spec.axis not in (None, 0)):
            continue
        sites.append(BiasSite(layer.name, names[id(wq)], names[id(xq)], bias.detach()))
    return sites


def _input_quantizer(model: nn.Module, layer: Layer) -> TensorQuantizer | None:
    own = layer.module._modules.get("input_quantizer") if layer.module is not None else None
    if isinstance(own, TensorQuantizer):
        return own  # a layer quantized by module swap (called from eager code)
    found = input_module(model, layer)
    return found[1] if found and isinstance(found[1], TensorQuantizer) and found[1].mode != "disabled" else None


def widen_for_int32_bias(qmodel: nn.Module, sites: list[BiasSite]) -> PTQReport:
    """Raise, in the converted ``qmodel``, the frozen weight step of each output channel of ``sites`` whose bias
    would need more than int32 codes at ``s_x * s_w``; returns what changed, per layer."""
    report = PTQReport("int32_bias")
    modules = dict(qmodel.named_modules())
    for site in sites:
        wq, xq = modules.get(site.weight_quantizer), modules.get(site.input_quantizer)
        if not (isinstance(wq, FrozenQuantizer) and isinstance(xq, FrozenQuantizer)):
            continue
        need = site.bias.double().abs().to(wq.scale.device) / (xq.scale.double() * INT32_MAX) * MARGIN
        if wq.scale.dim() == 0:
            need = need.max()
        low = wq.scale.double() < need
        if not low.any():
            continue
        smallest = float((wq.scale.double() / need.clamp_min(torch.finfo(torch.float64).tiny))[low].min())
        wq.scale.copy_(torch.where(low, need, wq.scale.double()).float())
        count = int(low.sum())
        report.done.append(f"`{site.layer}`: {count} output channel(s) with near-zero weights got a weight step "
                           f"whose int32 bias codes hold the bias (was down to {smallest:.1e} of it), so ONNX "
                           "Runtime runs the layer as one fused integer op")
        report.data[site.layer] = {"channels": count, "of": int(low.numel())}
    return report
