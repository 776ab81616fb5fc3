"""Patterns over op kinds, matched with networkx's DiGraphMatcher.

Why networkx rather than torch.fx's SubgraphMatcher: SubgraphMatcher compares exact call targets, so one
pattern would be needed for ``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()``; matching on canonical
kinds (fxquant.ops.kinds) makes one readable pattern cover them all. networkx also gives the ancestor and path
queries the residual-add analysis needs on the same graph view.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx, nn

from fxquant.errors import ConfigError, ConfigTypeError
from fxquant.ops.kinds import node_kind

Match = dict[str, fx.Node]


Kind = str | type | Callable
"""What a pattern node accepts: an op kind ("conv", see fxquant.ops.kinds), an nn.Module class (matches call_module
nodes of that class or a subclass), or a function (matches call_function nodes calling it)."""


def _kinds(value: object) -> frozenset:
    if isinstance(value, (str, type)) or callable(value):
        return frozenset({value})
    if isinstance(value, Iterable):
        return frozenset(value)
    raise ConfigTypeError(f"pattern node kinds must be a kind name, an nn.Module class, a function, or a set of them; "
                          f"got {value!r}")


@dataclass(frozen=True)
class Pattern:
    """Named nodes, each allowed a set of kinds, joined by directed edges (producer -> consumer).

    A kind is an op-kind name (``"conv"``, ``"silu"``, ...; see ``fxquant.ops.kinds``), an ``nn.Module`` class
    (matching modules of that class, e.g. a custom attention block kept as a leaf) or a function.
    """

    nodes: tuple[tuple[str, frozenset[Kind]], ...]
    edges: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        names = [name for name, _ in self.nodes]
        if not names:
            raise ConfigError("a Pattern needs at least one node, e.g. Pattern.chain(('conv', 'conv'))")
        for name, kinds in self.nodes:
            if not isinstance(name, str) or not name:
                raise ConfigTypeError(f"pattern node names must be non-empty strings, got {name!r}")
            if not kinds:
                raise ConfigError(f"pattern node {name!r} accepts no kind; give at least one")
            for k in kinds:
                if not isinstance(k, (str, type)) and not callable(k):
                    raise ConfigTypeError(f"pattern node {name!r}: {k!r} is not a kind name, module class or function")
        if len(set(names)) != len(names):
            raise ConfigError(f"pattern node names must be unique, got {names}")
        for a, b in self.edges:
            if a not in names or b not in names:
                raise ConfigError(f"pattern edge ({a!r}, {b!r}) names a node that is not in the pattern {names}")

    @staticmethod
    def chain(*steps: tuple[str, Kind | Iterable[Kind]]) -> Pattern:
        """A linear pattern: ``Pattern.chain(("conv", {"conv"}), ("act", "silu"))``."""
        nodes = tuple((name, _kinds(kinds)) for name, kinds in steps)
        edges = tuple((a[0], b[0]) for a, b in itertools.pairwise(nodes))
        return Pattern(nodes, edges)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.nodes)

    def kind_names(self) -> set[str]:
        """The op-kind names (strings) the pattern uses."""
        return {k for _, kinds in self.nodes for k in kinds if isinstance(k, str)}

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
            self.digraph.add_node(n, kind=kind, node=n)
            for inp in n.all_input_nodes:
                self.digraph.add_edge(inp, n)

    def accepts(self, node: fx.Node, kinds: frozenset[Kind]) -> bool:
        """Whether ``node`` is one of ``kinds`` (op-kind names, module classes, functions)."""
        if self.kinds[node] in kinds:
            return True
        for k in kinds:
            if isinstance(k, type):
                if node.op == "call_module" and isinstance(self.modules[node.target], k):
                    return True
            elif not isinstance(k, str) and node.op == "call_function" and node.target is k:
                return True
        return False

    def match(self, pattern: Pattern) -> Iterator[Match]:
        """All matches of ``pattern``, in graph order of their first node; each is {pattern name: node}."""
        p = pattern.to_digraph()
        if len(pattern.nodes) == 1:  # the common case needs no isomorphism search
            name, kinds = pattern.nodes[0]
            yield from ({name: n} for n in self.kinds if self.accepts(n, kinds))
            return
        if all(isinstance(k, str) for _, kinds in pattern.nodes for k in kinds):  # the fast common case
            def node_match(g: dict, q: dict) -> bool:
                return g["kind"] in q["kinds"]
        else:
            def node_match(g: dict, q: dict) -> bool:
                return self.accepts(g["node"], q["kinds"])
        matcher = DiGraphMatcher(self.digraph, p, node_match=node_match)
        order = {n: i for i, n in enumerate(self.kinds)}
        found = [{v: k for k, v in m.items()} for m in matcher.subgraph_monomorphisms_iter()]
        found.sort(key=lambda m: order[m[pattern.names[0]]])
        yield from found
