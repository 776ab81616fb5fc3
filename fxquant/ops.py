"""Op-kind table: nn modules, torch functions and Tensor methods mapped to canonical kinds.

Rules and passes speak in kinds ("conv", "add", "relu", ...), so ``nn.ReLU``, ``F.relu``, ``torch.relu`` and
``x.relu()`` are one thing to them. Unknown ops get the kind ``"other"``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import fx, nn
from torchvision.models import swin_transformer

from fxquant.attention_ops import masked_softmax

MODULE_KINDS: dict[type, str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose", nn.ConvTranspose2d: "conv_transpose", nn.ConvTranspose3d: "conv_transpose",
    nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh",
    nn.MaxPool1d: "max_pool", nn.MaxPool2d: "max_pool", nn.MaxPool3d: "max_pool",
    nn.AdaptiveMaxPool1d: "max_pool", nn.AdaptiveMaxPool2d: "max_pool", nn.AdaptiveMaxPool3d: "max_pool",
    nn.AvgPool1d: "avg_pool", nn.AvgPool2d: "avg_pool", nn.AvgPool3d: "avg_pool",
    nn.AdaptiveAvgPool1d: "avg_pool", nn.AdaptiveAvgPool2d: "avg_pool", nn.AdaptiveAvgPool3d: "avg_pool",
    nn.Flatten: "reshape", nn.Identity: "identity", nn.Dropout: "identity", nn.Dropout2d: "identity",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.GELU: "gelu", nn.Tanh: "tanh", nn.Softmax: "softmax", nn.LayerNorm: "layer_norm",
}

FUNCTION_KINDS: dict[object, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat",
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.adaptive_max_pool2d: "max_pool",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool", F.adaptive_avg_pool3d: "avg_pool",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
    F.dropout: "identity",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu",
    F.softmax: "softmax", torch.softmax: "softmax", F.layer_norm: "layer_norm",
    F.hardsigmoid: "hardsigmoid", torch.tanh: "tanh", torch.mean: "mean",
    torch.einsum: "matmul",  # the exporter lowers a two-operand einsum to (batched) MatMul
    torch.transpose: "permute", torch.permute: "permute", torch.swapaxes: "permute",
    torch.chunk: "split", torch.split: "split", torch.unbind: "split", operator.getitem: "getitem",
    torch.stack: "cat",
    # StochasticDepth is the identity in eval mode, which prepare() traces in
    torchvision.ops.stochastic_depth: "identity",
    F.pad: "pad", swin_transformer._patch_merging_pad: "pad", torch.roll: "roll",
    # torchvision wraps it with torch.fx.wrap: one opaque call holding Linear layers and attention matmuls
    swin_transformer.shifted_window_attention: "window_attention",
    swin_transformer._get_relative_position_bias: "position_bias",  # a gather from parameters only
    masked_softmax: "masked_softmax",  # decomposed attention's mask + softmax (fxquant.passes.decompose_sdpa)
}

METHOD_KINDS: dict[str, str] = {
    "add": "add", "add_": "add", "__add__": "add", "mul": "mul", "mul_": "mul",
    "relu": "relu", "relu_": "relu",
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "squeeze": "reshape", "unsqueeze": "reshape",
    "contiguous": "identity", "permute": "permute", "transpose": "permute",
    "matmul": "matmul", "bmm": "matmul", "sigmoid": "sigmoid", "softmax": "softmax", "mean": "mean",
    "swapaxes": "permute", "expand": "reshape", "unflatten": "reshape",
    "chunk": "split", "split": "split", "unbind": "split",
}

WEIGHTED_KINDS = frozenset({"conv", "conv_transpose", "linear"})
"""Kinds whose module form carries a weight to quantize."""

# Output-channel axis of the weight for each weighted module kind.
WEIGHT_AXIS = {"conv": 0, "conv_transpose": 1, "linear": 0}


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The canonical kind of an FX node ("placeholder", "output", "constant" or an op kind)."""
    if node.op == "placeholder":
        return "placeholder"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "constant"
    if node.op == "call_module":
        return module_kind(modules[node.target])
    if node.op == "call_function":
        return FUNCTION_KINDS.get(node.target, "other")
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, "other")
    return "other"


def module_kind(module: nn.Module) -> str:
    """Kind of a module, by exact type first, then by the nearest known base class."""
    kind = MODULE_KINDS.get(type(module))
    if kind is not None:
        return kind
    for base in type(module).__mro__[1:]:
        if base in MODULE_KINDS:
            return MODULE_KINDS[base]
    return "other"
