"""Which input of an add is the residual (identity / skip) input.

The rule, in order:
1. If one input is an ancestor of the other, it is the skip input: the other branch starts from it
   (BasicBlock, Bottleneck, add -> ReLU, ConvNeXt's ``x + scale * block(x)``).
2. Otherwise, if the inputs share an ancestor (a downsample shortcut: conv on both sides), the skip input is
   the branch with fewer weighted ops between the nearest common ancestor and the add.
3. Inputs with no common ancestor are not a residual: there is no skip input.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from fxquant.ops import WEIGHTED_KINDS
from fxquant.rules.pattern import GraphView


def skip_input(view: GraphView, a: fx.Node, b: fx.Node) -> tuple[fx.Node | None, str]:
    """(the skip input or None, why)."""
    if a is b:
        return None, "adds a tensor to itself: not a residual"
    anc_a = nx.ancestors(view.digraph, a)
    anc_b = nx.ancestors(view.digraph, b)
    if a in anc_b:
        return a, f"`{a.name}` feeds the other branch"
    if b in anc_a:
        return b, f"`{b.name}` feeds the other branch"
    common = {n for n in anc_a & anc_b if view.kinds[n] != "constant"}
    if not common:
        return None, "its inputs share no ancestor: not a residual"
    order = {n: i for i, n in enumerate(view.kinds)}
    nca = max(common, key=order.__getitem__)
    below = nx.descendants(view.digraph, nca)

    def weighted(x: fx.Node) -> int:
        branch = (anc_a if x is a else anc_b) | {x}
        return sum(1 for n in branch & below if view.kinds[n] in WEIGHTED_KINDS)

    wa, wb = weighted(a), weighted(b)
    if wa == wb:
        return None, f"both branches from `{nca.name}` have {wa} weighted ops: no shorter skip branch"
    skip = a if wa < wb else b
    return skip, f"`{skip.name}` is the shorter branch from `{nca.name}` ({min(wa, wb)} vs {max(wa, wb)} weighted ops)"
