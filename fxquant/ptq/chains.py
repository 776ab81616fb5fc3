"""Chains of weighted layers joined by ops that commute with a positive per-channel scale.

Layer A feeds layer B through ReLU, identity, max/average pooling and flatten, and nothing else reads the
tensors in between. Then scaling A's output channel c by 1/s_c and B's input channel c by s_c leaves the
function unchanged (ReLU(x/s) = ReLU(x)/s and pooling is linear or max for s > 0). Cross-layer equalization
and high-bias absorption work on these links. Layers are the convolutions (grouped and depthwise included) and
Linears of ``fxquant.ops.kinds.weighted_ops``: module calls or functional calls on parameters, whose weights no other
op reads. With ``relu6_as_relu``, ReLU6 (and Hardtanh clipping at 0) count as ReLU: the DFQ paper's recipe for
MobileNetV2, which changes the function where activations exceed the clip (``equalize`` measures by how much).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.ops.kinds import WeightedOp, module_kind, node_kind, weighted_ops

LAYER_KINDS = frozenset({"conv", "linear"})
CLIPPED = frozenset({"relu6", "hardtanh"})
HOMOGENEOUS = frozenset({"relu", "identity", "max_pool", "avg_pool", "reshape"})
NOT_HOMOGENEOUS = {
    "relu6": "ReLU6 is not positively homogeneous (min(ReLU(x/s), 6) != min(ReLU(x), 6)/s): fxquant keeps the "
             "function and does not equalize through it; QuantConfig(equalize_relu6=True) treats it as ReLU "
             "(DFQ's recipe for MobileNetV2) and reports the change in float output",
    "hardtanh": "Hardtanh clips at fixed bounds, so it does not commute with channel scaling",
}


@dataclass
class Link:
    """``a`` feeds ``b`` through ``via``; each output channel of ``a`` is ``repeat`` input features of ``b``
    (more than 1 when a flatten sits between a conv and a Linear)."""

    a: fx.Node
    b: fx.Node
    via: tuple[fx.Node, ...]
    kinds: tuple[str, ...]
    repeat: int = 1

    @property
    def through_relu(self) -> bool:
        return "relu" in self.kinds

    @property
    def clipped(self) -> tuple[fx.Node, ...]:
        """The ReLU6 / Hardtanh nodes this link treats as ReLU (``relu6_as_relu``)."""
        return tuple(n for n, k in zip(self.via, self.kinds, strict=True) if k in CLIPPED)


@dataclass
class Chain:
    layers: list[fx.Node]
    links: list[Link] = field(default_factory=list)

    def describe(self) -> str:
        return " -> ".join(f"`{op_name(n)}`" for n in self.layers)


def op_name(node: fx.Node) -> str:
    """A layer's name in reports: its module path, or the node name of a functional call."""
    return node.target if node.op == "call_module" else node.name


def _is_layer(node: fx.Node, ops: dict[fx.Node, WeightedOp]) -> bool:
    return node in ops and ops[node].kind in LAYER_KINDS


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_repeat(node: fx.Node) -> int | None:
    """For a reshape node that flattens (N, C, *S) to (N, C * prod(S)): prod(S); else None."""
    src = node.all_input_nodes[0] if node.all_input_nodes else None
    before, after = (_shape(src) if src is not None else None), _shape(node)
    if before is None or after is None or len(before) < 2 or len(after) != 2 or before[0] != after[0]:
        return None
    spatial = math.prod(before[2:])
    return spatial if after[1] == before[1] * spatial else None


def find_chains(gm: fx.GraphModule, relu6_as_relu: bool = False) -> tuple[list[Chain], list[str]]:
    """Maximal chains of linked weighted layers, in graph order, and notes on links that were refused."""
    modules = dict(gm.named_modules())
    ops, declined = weighted_ops(gm)
    notes: list[str] = [f"`{op_name(n)}` not equalized: {why}" for n, why in declined.items()]
    links: dict[fx.Node, Link] = {}
    for a in gm.graph.nodes:
        if not _is_layer(a, ops):
            continue
        link = _follow(a, modules, ops, notes, relu6_as_relu)
        if link is not None:
            links[a] = link
    targets = {link.b for link in links.values()}
    chains = []
    for a in gm.graph.nodes:
        if a in links and a not in targets:
            chain = Chain([a])
            while chain.layers[-1] in links:
                link = links[chain.layers[-1]]
                chain.links.append(link)
                chain.layers.append(link.b)
            chains.append(chain)
    return chains, notes


def _follow(a: fx.Node, modules: dict, ops: dict[fx.Node, WeightedOp], notes: list[str],
            relu6_as_relu: bool) -> Link | None:
    """The link from layer ``a`` to the next weighted layer, or None (with a note when it is worth one)."""
    via: list[fx.Node] = []
    kinds: list[str] = []
    repeat = 1
    cur = a
    while True:
        if len(cur.users) != 1:
            if len(cur.users) > 1:
                notes.append(f"`{op_name(a)}` not equalized with a following layer: its output "
                             f"{'(through ' + ', '.join(v.name for v in via) + ') ' if via else ''}has "
                             f"{len(cur.users)} users (e.g. a residual branch)")
            return None
        nxt = next(iter(cur.users))
        kind = node_kind(nxt, modules)
        if _is_layer(nxt, ops) and nxt.args and nxt.args[0] is cur:
            break
        if relu6_as_relu and kind in CLIPPED:
            reason = _clip_at_zero(nxt, modules)
            if reason is not None:
                notes.append(f"`{op_name(a)}` not equalized through `{nxt.name}`: {reason}")
                return None
        elif kind in NOT_HOMOGENEOUS:
            notes.append(f"`{op_name(a)}` not equalized through `{nxt.name}`: {NOT_HOMOGENEOUS[kind]}")
            return None
        if kind not in HOMOGENEOUS and kind not in CLIPPED:
            return None  # the chain simply ends (add, cat, output, other ops)
        if kind == "reshape":
            r = _flatten_repeat(nxt)
            if r is None:
                notes.append(f"`{op_name(a)}` not equalized through `{nxt.name}`: only a flatten of "
                             "(N, C, ...) to (N, features) keeps channels identifiable")
                return None
            repeat *= r
        if nxt.op == "call_function" and kind in ("relu", "identity") and len(nxt.all_input_nodes) != 1:
            return None
        via.append(nxt)
        kinds.append(kind)
        cur = nxt
    b = nxt
    ma, mb = ops[a], ops[b]
    if ma.out_channels * repeat != mb.in_channels:
        notes.append(f"`{op_name(a)}` -> `{op_name(b)}` not equalized: {ma.out_channels} output channels x {repeat} "
                     f"do not match {mb.in_channels} input features")
        return None
    if not (ma.weight.is_floating_point() and mb.weight.is_floating_point()):
        return None
    return Link(a, b, tuple(via), tuple(kinds), repeat)


def _clip_at_zero(node: fx.Node, modules: dict) -> str | None:
    """None when a ReLU6 / Hardtanh node clips at 0 below (so it acts as ReLU up to its upper clip)."""
    if node.op == "call_module":
        low = getattr(modules[node.target], "min_val", 0.0)
    elif node.target is F.hardtanh:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    else:
        low = 0.0
    if node.op != "call_module" and len(node.all_input_nodes) != 1:
        return "its bounds are computed"
    return None if low == 0 else f"it clips at {low} below, so it is not a ReLU with an upper clip"


# ---- per-channel weight views ---------------------------------------------------------------------------
# a WeightedOp, a ptq.layers.Layer (both have weight, bias, kind, groups) or a Conv/Linear module
Weighted = WeightedOp | nn.Module


def output_ranges(op: Weighted) -> torch.Tensor:
    """max |W| per output channel."""
    w = op.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _grouped_view(op: Weighted, repeat: int, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The weight as (groups, out/groups, in/groups, rest) and the group count, where "in" counts A's
    channels (a Linear after a flatten reads ``repeat`` features per channel: they go into "rest")."""
    w = op.weight if weight is None else weight
    kind = module_kind(op) if isinstance(op, nn.Module) else op.kind
    if kind == "linear":
        return w.reshape(1, w.shape[0], w.shape[1] // repeat, repeat), 1
    g = getattr(op, "groups", 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1), g


def input_ranges(op: Weighted, repeat: int = 1) -> torch.Tensor:
    """max |W| over everything that reads input channel c (of the previous layer), per c."""
    view, _ = _grouped_view(op, repeat)
    return view.detach().abs().amax(dim=(1, 3)).reshape(-1)


@torch.no_grad()
def scale_output(op: Weighted, factor: torch.Tensor) -> None:
    """Multiply output channel c of ``op`` (weight rows and bias) by ``factor[c]``, in place."""
    op.weight.mul_(factor.view(-1, *([1] * (op.weight.dim() - 1))).to(op.weight.dtype))
    if op.bias is not None:
        op.bias.mul_(factor.to(op.bias.dtype))


@torch.no_grad()
def scale_input(op: Weighted, factor: torch.Tensor, repeat: int = 1) -> None:
    """Multiply everything in ``op`` that reads input channel c by ``factor[c]``, in place."""
    view, g = _grouped_view(op, repeat)
    view.mul_(factor.view(g, 1, -1, 1).to(view.dtype))  # a view: writes through to the weight


@torch.no_grad()
def input_response(op: Weighted, values: torch.Tensor, repeat: int = 1,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """What ``op`` (or ``weight`` in its place) adds to each output when input channel c is the constant
    ``values[c]`` everywhere (no padding): the sum over the kernel and the channel's features of W times it."""
    view, g = _grouped_view(op, repeat, weight)
    summed = view.sum(dim=3)  # (g, out/g, in/g)
    return torch.bmm(summed, values.view(g, -1, 1).to(summed.dtype)).reshape(-1)
