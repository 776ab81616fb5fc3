"""BatchNorm statistics kept past folding: the per-channel distribution of each folded layer's output.

DFQ (Nagel et al. 2019) reads a layer's pre-activation distribution from the BatchNorm that follows it:
channel c is about N(beta_c, |gamma_c|). Folding deletes the BatchNorm, so this pass, run just before folding,
stores (mean, std) on the layer's node (``fxquant.provenance.info(node).bn_stats``); equalization keeps them in step
with its rescaling; high-bias absorption and analytical bias correction read them.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.ops.kinds import weighted_ops
from fxquant.passes.manager import PassResult
from fxquant.provenance import ChannelStats, info, read
from fxquant.ptq.chains import LAYER_KINDS


def record_bn_stats(gm: fx.GraphModule) -> PassResult:
    """Store the output distribution of every Conv/Linear -> affine BatchNorm pair on the layer's node."""
    modules = dict(gm.named_modules())
    ops, _ = weighted_ops(gm)
    for node, op in ops.items():
        if op.kind not in LAYER_KINDS or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        bn = modules.get(bn_node.target) if bn_node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
            continue
        info(node).bn_stats = ChannelStats(bn.bias.detach().clone().float(), bn.weight.detach().abs().clone().float())
    return PassResult(gm, False)


def bn_stats(node: fx.Node) -> ChannelStats | None:
    """(mean, std) of ``node``'s output channels, when its BatchNorm was folded into it; else None."""
    record = read(node)
    return record.bn_stats if record.folded_bn else None


def scale_stats(node: fx.Node, factor: torch.Tensor) -> None:
    """Keep the recorded distribution in step when output channel c of ``node`` is multiplied by factor[c]."""
    stats = read(node).bn_stats
    if stats is not None:
        stats.mean = stats.mean * factor
        stats.std = stats.std * factor.abs()


def shift_stats(node: fx.Node, delta: torch.Tensor) -> None:
    """Keep the recorded distribution in step when ``delta`` is added to output channel c of ``node``."""
    stats = read(node).bn_stats
    if stats is not None:
        stats.mean = stats.mean + delta
