"""Fold BatchNorm into the preceding Conv / ConvTranspose / Linear, when it is legal.

The weighted op is any ``fxquant.ops.kinds.WeightedOp``: a module call (subclasses included) or a functional
``F.conv*``/``F.linear`` with parameter weights; a functional op without bias gets one (a new parameter).

Contract: output equal to the input graph's (float noise aside) for every folded pair; each pair that cannot
be folded is skipped with a reason (a warning, or an error in strict mode).
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from fxquant.errors import PassError
from fxquant.ops.kinds import WeightedOp, weighted_ops
from fxquant.passes.manager import PassResult
from fxquant.provenance import info
from fxquant.rules import GraphView, Match, Pattern

FOLD_PATTERNS = {
    "conv_bn": Pattern.chain(("conv", "conv"), ("bn", "batch_norm")),
    "conv_transpose_bn": Pattern.chain(("conv", "conv_transpose"), ("bn", "batch_norm")),
    "linear_bn": Pattern.chain(("conv", "linear"), ("bn", "batch_norm")),
}


def _call_sites(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def fold_legality(match: Match, view: GraphView, ops: dict[fx.Node, WeightedOp] | None = None,
                  declined: dict[fx.Node, str] | None = None) -> str | None:
    """None when ``conv -> bn`` can be folded, else the reason it cannot (``ops``/``declined``: ``weighted_ops``)."""
    if ops is None or declined is None:
        ops, declined = weighted_ops(view.gm)
    conv, bn = match["conv"], match["bn"]
    name = conv.target if conv.op == "call_module" else conv.name
    if bn.op != "call_module":
        return f"`{bn.name}` is a functional BatchNorm; only BatchNorm modules are folded"
    bn_mod = view.modules[bn.target]
    if len(conv.users) != 1:
        return f"the output of `{name}` is also used outside `{bn.target}`"
    if bn_mod.training:
        return (f"`{bn.target}` is in training mode, so it normalizes with batch statistics; "
                "call model.eval() first")
    if not bn_mod.track_running_stats or bn_mod.running_mean is None:
        return f"`{bn.target}` keeps no running statistics (track_running_stats=False)"
    if conv.op == "call_module" and _call_sites(view.gm, conv.target) > 1:
        return f"`{conv.target}` is called at {_call_sites(view.gm, conv.target)} places; folding would change all"
    if _call_sites(view.gm, bn.target) > 1:
        return f"`{bn.target}` is called at {_call_sites(view.gm, bn.target)} places"
    if conv in declined:
        return declined[conv]
    op = ops[conv]
    if bn_mod.num_features != op.out_channels:
        return f"`{bn.target}` has {bn_mod.num_features} features but `{name}` has {op.out_channels} outputs"
    meta = conv.meta.get("tensor_meta")
    if op.kind == "linear" and (meta is None or len(meta.shape) != 2):
        return f"`{bn.target}` after Linear normalizes a non-2D tensor (features are not on axis 1)"
    return None


@torch.no_grad()
def folded(op: WeightedOp, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``op`` with ``bn`` folded in."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    w = op.weight
    if op.kind == "conv_transpose":
        # weight: (in, out/groups, *k); output channel o = g * (out/groups) + j
        g = op.groups
        w_view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        f_view = factor.view(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (w_view * f_view).view_as(w)
    else:
        new_w = w * factor.view(-1, *([1] * (w.dim() - 1)))
    bias = op.bias if op.bias is not None else torch.zeros_like(bn.running_mean)
    return new_w.to(w.dtype), ((bias - bn.running_mean) * factor + beta).to(w.dtype)


def fold_bn(gm: fx.GraphModule, strict: bool = False) -> PassResult:
    """Fold every legal Conv/ConvTranspose/Linear -> BatchNorm pair; skip the rest with a reason."""
    view = GraphView(gm)
    ops, declined = weighted_ops(gm)
    notes: list[str] = []
    modified = False
    for pattern in FOLD_PATTERNS.values():
        for match in list(view.match(pattern)):
            conv, bn = match["conv"], match["bn"]
            reason = fold_legality(match, view, ops, declined)
            if reason is not None:
                where = bn.target if bn.op == "call_module" else bn.name  # the module's path, as users write it
                msg = f"BatchNorm `{where}` not folded: {reason}"
                if strict:
                    raise PassError(msg)
                warnings.warn(msg, stacklevel=2)
                notes.append(msg)
                continue
            weight, bias = folded(ops[conv], view.modules[bn.target])
            ops[conv].write(weight, bias)
            bn.replace_all_uses_with(conv)
            gm.graph.erase_node(bn)
            gm.delete_submodule(bn.target)
            info(conv).folded_bn = bn.target
            modified = True
    return PassResult(gm, modified, notes)

