"""One typed record per graph node of what fxquant's passes decided about it (``node.meta["fxquant"]``).

Passes hand their results to each other through return values (``fxquant.passes.manager.PassResult``); this
record is what stays on the graph for the passes that run later on the prepared model (calibrate-time PTQ,
sensitivity) and for people reading it: which pass made a node, which rule claimed it, what was folded into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

KEY = "fxquant"


@dataclass
class ChannelStats:
    """Per-channel mean and standard deviation of a layer's output (from the BatchNorm folded into it)."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class ExpectedInput:
    """E[input channel] of a layer, known from the folded BatchNorm of the layer before (``repeat``: how many
    input features each of those channels feeds, e.g. after flatten)."""

    mean: torch.Tensor
    repeat: int


@dataclass
class QuantizerSite:
    """An inserted quantizer call: the tensor it quantizes and the rules / quantized units that asked for it
    (``asks``: (unit, user node name or None for all users))."""

    quantizes: str
    rules: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    asks: list[tuple[str | None, str | None]] = field(default_factory=list)


@dataclass
class NodeInfo:
    """What fxquant recorded about one node; every field is optional."""

    made_by: str | None = None  # the pass that created the node
    rule: str | None = None  # "<backend>.<rule>" that claimed the node (annotate)
    unit: str | None = None  # the quantized unit (first node of the rule's match) the node belongs to
    weight_rule: str | None = None  # the rule that gave the node's module a weight quantizer
    quantizer: QuantizerSite | None = None  # set on inserted quantizer calls
    folded_bn: str | None = None  # the BatchNorm folded into this layer
    bn_stats: ChannelStats | None = None  # its output distribution, kept past folding (PTQ)
    expected_input: ExpectedInput | str | None = None  # E[input] for analytical bias correction, or why unknown
    decomposed_from: str | None = None  # the module a decomposition pass rewrote into this node
    residual: str | None = None  # why an add counts as a residual join (tensorrt placement)
    pad_merged_into: str | None = None  # the convs whose ONNX pads export_onnx merges this zero pad into (fold_pad)


def info(node: fx.Node) -> NodeInfo:
    """The record of ``node``, created empty on first use."""
    record = node.meta.get(KEY)
    if not isinstance(record, NodeInfo):
        record = node.meta[KEY] = NodeInfo()
    return record


def read(node: fx.Node) -> NodeInfo:
    """The record of ``node`` for reading: an empty one (not attached) when nothing was recorded."""
    record = node.meta.get(KEY)
    return record if isinstance(record, NodeInfo) else NodeInfo()
