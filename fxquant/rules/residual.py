"""Which input of an add is the residual (identity / skip) input.

The rule, in order:
1. If one input is an ancestor of the other, it is the skip input: the other branch starts from it
   (BasicBlock, Bottleneck, add -> ReLU, ConvNeXt's ``x + scale * block(x)``).
2. Otherwise, if the inputs share an ancestor (a downsample shortcut: conv on both sides), the skip input is
   the branch with fewer weighted ops between the nearest common ancestor and the add.
3. Inputs with no common ancestor are not a residual: there is no skip input.
"""

from __future__ import annotations

from torch import fx

from fxquant.ops.kinds import WEIGHTED_KINDS
from fxquant.rules.pattern import GraphView


class Reachability:
    """Ancestor and descendant sets of every node as integer bitsets (bit i = the i-th node in graph order),
    built in one pass each way: a residual query is then a few big-int operations instead of a graph search
    per add, which kept prepare linear in graph size."""

    def __init__(self, view: GraphView) -> None:
        self.nodes = list(view.kinds)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.ancestors = [0] * len(self.nodes)
        for i, n in enumerate(self.nodes):  # graph order is topological
            bits = 0
            for p in n.all_input_nodes:
                j = self.index[p]
                bits |= self.ancestors[j] | (1 << j)
            self.ancestors[i] = bits
        self.descendants = [0] * len(self.nodes)
        for i in range(len(self.nodes) - 1, -1, -1):
            bits = 0
            for u in self.nodes[i].users:
                j = self.index[u]
                bits |= self.descendants[j] | (1 << j)
            self.descendants[i] = bits
        self.constants = self._mask(view, lambda k: k == "constant")
        self.weighted = self._mask(view, lambda k: k in WEIGHTED_KINDS)

    def _mask(self, view: GraphView, keep) -> int:
        return sum(1 << i for i, n in enumerate(self.nodes) if keep(view.kinds[n]))

    @staticmethod
    def of(view: GraphView) -> Reachability:
        """The view's reachability, built on first use (a view describes one unchanging graph)."""
        reach = view.__dict__.get("_reachability")
        if reach is None:
            reach = view.__dict__["_reachability"] = Reachability(view)
        return reach


def skip_input(view: GraphView, a: fx.Node, b: fx.Node) -> tuple[fx.Node | None, str]:
    """(the skip input or None, why)."""
    if a is b:
        return None, "adds a tensor to itself: not a residual"
    r = Reachability.of(view)
    ia, ib = r.index[a], r.index[b]
    anc_a, anc_b = r.ancestors[ia], r.ancestors[ib]
    if anc_b >> ia & 1:
        return a, f"`{a.name}` feeds the other branch"
    if anc_a >> ib & 1:
        return b, f"`{b.name}` feeds the other branch"
    common = anc_a & anc_b & ~r.constants
    if not common:
        return None, "its inputs share no ancestor: not a residual"
    nca_index = common.bit_length() - 1  # the latest common ancestor in graph order
    nca = r.nodes[nca_index]
    below = r.descendants[nca_index]

    def weighted(i: int, ancestors: int) -> int:
        return ((ancestors | 1 << i) & below & r.weighted).bit_count()

    wa, wb = weighted(ia, anc_a), weighted(ib, anc_b)
    if wa == wb:
        return None, f"both branches from `{nca.name}` have {wa} weighted ops: no shorter skip branch"
    skip = a if wa < wb else b
    return skip, f"`{skip.name}` is the shorter branch from `{nca.name}` ({min(wa, wb)} vs {max(wa, wb)} weighted ops)"
