"""Patterns over op kinds, matched with networkx's DiGraphMatcher.

Why networkx rather than torch.fx's SubgraphMatcher: SubgraphMatcher compares exact call targets, so one
pattern would be needed for ``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()``; matching on canonical
kinds (fxquant.ops) makes one readable pattern cover them all. networkx also gives the ancestor and path
queries the residual-add analysis needs on the same graph view.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx, nn

from fxquant.ops import node_kind

Match = dict[str, fx.Node]


@dataclass(frozen=True)
class Pattern:
    """Named nodes, each allowed a set of kinds, joined by directed edges (producer -> consumer)."""

    nodes: tuple[tuple[str, frozenset[str]], ...]
    edges: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def chain(*steps: tuple[str, Iterable[str] | str]) -> Pattern:
        """A linear pattern: ``Pattern.chain(("conv", {"conv"}), ("bn", "batch_norm"))``."""
        nodes = tuple((name, frozenset({kinds}) if isinstance(kinds, str) else frozenset(kinds))
                      for name, kinds in steps)
        edges = tuple((a[0], b[0]) for a, b in itertools.pairwise(nodes))
        return Pattern(nodes, edges)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.nodes)

    def to_digraph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for name, kinds in self.nodes:
            g.add_node(name, kinds=kinds)
        g.add_edges_from(self.edges)
        return g


class GraphView:
    """An FX graph as a networkx DiGraph of nodes annotated with their kinds."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.kinds: dict[fx.Node, str] = {n: node_kind(n, self.modules) for n in gm.graph.nodes}
        self.digraph = nx.DiGraph()
        for n, kind in self.kinds.items():
            self.digraph.add_node(n, kind=kind)
            for inp in n.all_input_nodes:
                self.digraph.add_edge(inp, n)

    def match(self, pattern: Pattern) -> Iterator[Match]:
        """All matches of ``pattern``, in graph order of their first node; each is {pattern name: node}."""
        p = pattern.to_digraph()
        if len(pattern.nodes) == 1:  # the common case needs no isomorphism search
            name, kinds = pattern.nodes[0]
            yield from ({name: n} for n, k in self.kinds.items() if k in kinds)
            return
        matcher = DiGraphMatcher(self.digraph, p, node_match=lambda g, q: g["kind"] in q["kinds"])
        order = {n: i for i, n in enumerate(self.kinds)}
        found = [{v: k for k, v in m.items()} for m in matcher.subgraph_monomorphisms_iter()]
        found.sort(key=lambda m: order[m[pattern.names[0]]])
        yield from found
