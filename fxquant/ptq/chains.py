"""Chains of weighted layers joined by ops that commute with a positive per-channel scale.

Layer A feeds layer B through ReLU, identity, max/average pooling and flatten, and nothing else reads the
tensors in between. Then scaling A's output channel c by 1/s_c and B's input channel c by s_c leaves the
function unchanged (ReLU(x/s) = ReLU(x)/s and pooling is linear or max for s > 0). Cross-layer equalization
and high-bias absorption work on these links. Weighted layers are Conv1d/2d/3d modules (grouped and depthwise
included) and Linear; each must be called at one place in the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fxquant.ops import node_kind

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HOMOGENEOUS = frozenset({"relu", "identity", "max_pool", "avg_pool", "reshape"})
NOT_HOMOGENEOUS = {
    "relu6": "ReLU6 is not positively homogeneous (min(ReLU(x/s), 6) != min(ReLU(x), 6)/s): fxquant keeps the "
             "function and does not equalize through it; replace ReLU6 by ReLU in the model if you accept the "
             "change (DFQ's recipe), then equalize",
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


@dataclass
class Chain:
    layers: list[fx.Node]
    links: list[Link] = field(default_factory=list)

    def describe(self) -> str:
        return " -> ".join(f"`{n.target}`" for n in self.layers)


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    # exact types: a subclass may override forward, and then its weight may not mean what we assume
    return node.op == "call_module" and type(modules[node.target]) in LAYER_TYPES


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


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


def _call_sites(gm: fx.GraphModule) -> dict[str, int]:
    sites: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites[n.target] = sites.get(n.target, 0) + 1
    return sites


def find_chains(gm: fx.GraphModule) -> tuple[list[Chain], list[str]]:
    """Maximal chains of linked weighted layers, in graph order, and notes on links that were refused."""
    modules = dict(gm.named_modules())
    sites = _call_sites(gm)
    notes: list[str] = []
    links: dict[fx.Node, Link] = {}
    for a in gm.graph.nodes:
        if not _is_layer(a, modules):
            continue
        link = _follow(a, modules, sites, notes)
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


def _follow(a: fx.Node, modules: dict[str, nn.Module], sites: dict[str, int], notes: list[str]) -> Link | None:
    """The link from layer ``a`` to the next weighted layer, or None (with a note when it is worth one)."""
    via: list[fx.Node] = []
    kinds: list[str] = []
    repeat = 1
    cur = a
    while True:
        if len(cur.users) != 1:
            if len(cur.users) > 1:
                notes.append(f"`{a.target}` not equalized with a following layer: its output "
                             f"{'(through ' + ', '.join(v.name for v in via) + ') ' if via else ''}has "
                             f"{len(cur.users)} users (e.g. a residual branch)")
            return None
        nxt = next(iter(cur.users))
        kind = node_kind(nxt, modules)
        if _is_layer(nxt, modules) and nxt.args and nxt.args[0] is cur:
            break
        if kind in NOT_HOMOGENEOUS:
            notes.append(f"`{a.target}` not equalized through `{nxt.name}`: {NOT_HOMOGENEOUS[kind]}")
            return None
        if kind not in HOMOGENEOUS:
            return None  # the chain simply ends (add, cat, output, other ops)
        if kind == "reshape":
            r = _flatten_repeat(nxt)
            if r is None:
                notes.append(f"`{a.target}` not equalized through `{nxt.name}`: only a flatten of "
                             "(N, C, ...) to (N, features) keeps channels identifiable")
                return None
            repeat *= r
        if nxt.op == "call_function" and kind in ("relu", "identity") and len(nxt.all_input_nodes) != 1:
            return None
        via.append(nxt)
        kinds.append(kind)
        cur = nxt
    b = nxt
    ma, mb = modules[a.target], modules[b.target]
    for node in (a, b):
        if sites.get(node.target, 0) > 1:
            notes.append(f"`{a.target}` -> `{b.target}` not equalized: `{node.target}` is called at "
                         f"{sites[node.target]} places, so rescaling it would change every call")
            return None
    if out_channels(ma) * repeat != in_features(mb):
        notes.append(f"`{a.target}` -> `{b.target}` not equalized: {out_channels(ma)} output channels x {repeat} "
                     f"do not match {in_features(mb)} input features")
        return None
    if not (ma.weight.is_floating_point() and mb.weight.is_floating_point()):
        return None
    return Link(a, b, tuple(via), tuple(kinds), repeat)


# ---- per-channel weight views ---------------------------------------------------------------------------
def output_ranges(module: nn.Module) -> torch.Tensor:
    """max |W| per output channel."""
    w = module.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _grouped_view(module: nn.Module, repeat: int, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The weight as (groups, out/groups, in/groups, rest) and the group count, where "in" counts A's
    channels (a Linear after a flatten reads ``repeat`` features per channel: they go into "rest")."""
    w = module.weight if weight is None else weight
    if isinstance(module, nn.Linear):
        return w.reshape(1, w.shape[0], w.shape[1] // repeat, repeat), 1
    g = module.groups
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1), g


def input_ranges(module: nn.Module, repeat: int = 1) -> torch.Tensor:
    """max |W| over everything that reads input channel c (of the previous layer), per c."""
    view, _ = _grouped_view(module, repeat)
    return view.detach().abs().amax(dim=(1, 3)).reshape(-1)


@torch.no_grad()
def scale_output(module: nn.Module, factor: torch.Tensor) -> None:
    """Multiply output channel c of ``module`` (weight rows and bias) by ``factor[c]``."""
    module.weight.mul_(factor.view(-1, *([1] * (module.weight.dim() - 1))).to(module.weight.dtype))
    if module.bias is not None:
        module.bias.mul_(factor.to(module.bias.dtype))


@torch.no_grad()
def scale_input(module: nn.Module, factor: torch.Tensor, repeat: int = 1) -> None:
    """Multiply everything in ``module`` that reads input channel c by ``factor[c]``."""
    view, g = _grouped_view(module, repeat)
    view.mul_(factor.view(g, 1, -1, 1).to(view.dtype))  # a view: writes through to the weight


@torch.no_grad()
def input_response(module: nn.Module, values: torch.Tensor, repeat: int = 1,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """What ``module`` (or ``weight`` in its place) adds to each output when input channel c is the constant
    ``values[c]`` everywhere (no padding): the sum over the kernel and the channel's features of W times it."""
    view, g = _grouped_view(module, repeat, weight)
    summed = view.sum(dim=3)  # (g, out/g, in/g)
    return torch.bmm(summed, values.view(g, -1, 1).to(summed.dtype)).reshape(-1)
