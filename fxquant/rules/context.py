"""The rule-writer API: what a rule's checks and handlers receive (``RuleContext``) and what they record
(``Annotations``: quantization requests, shared scales, weight specs, and why ops stay float).

A check or handler is a function ``(match, ctx) -> str | None``: None accepts, a string declines with that
reason. A handler annotates through the context::

    def conv_silu(match, ctx):
        conv = match["conv"]
        ctx.quantize_weight(conv, "conv_silu")                      # the conv's weight spec
        for x in ctx.activation_inputs(conv):
            ctx.request_input(conv, x, "conv_silu")               # a quantizer on the edge into the conv
        ctx.request_output(match["act"], "conv_silu")            # one on the SiLU's output, for all users
        return None

``ctx.spec(node, "weight"|"activation")`` gives the spec in force (backend default, config, overrides);
``ctx.share([...])`` makes requests share one scale; ``ctx.kind(node)`` and ``ctx.view`` answer graph queries.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from torch import fx

from fxquant.errors import PassError
from fxquant.ops.kinds import WEIGHT_AXIS, WEIGHTED_KINDS, parameter_arg
from fxquant.rules.pattern import GraphView
from fxquant.spec import QuantConfig, QuantSpec


class Policy(Protocol):
    """What a rule may read of its backend (``fxquant.Backend`` satisfies it)."""

    name: str
    weight: QuantSpec
    activation: QuantSpec
    passthrough: frozenset[str]
    float_reasons: Mapping[str, str]


@dataclass
class Request:
    """Targets ``value`` with ``spec``: for all its users (``user`` None) or on the edge into ``user``."""

    value: fx.Node
    user: fx.Node | None
    spec: QuantSpec
    rule: str
    unit: str | None = None  # name of the first node of the rule match that made the request (provenance)


@dataclass
class Annotations:
    """What the rules decided; consumed by the insertion pass."""

    requests: list[Request] = field(default_factory=list)
    shares: list[tuple[int, int]] = field(default_factory=list)
    shared_values: list[tuple[fx.Node, ...]] = field(default_factory=list)
    weights: dict[fx.Node, tuple[QuantSpec, str]] = field(default_factory=dict)
    quantized: dict[fx.Node, str] = field(default_factory=dict)
    passthrough: list[fx.Node] = field(default_factory=list)
    floats: dict[fx.Node, str] = field(default_factory=dict)


class RuleContext:
    """What a rule's checks and handlers see: the graph view, the specs, and the calls that annotate."""

    def __init__(self, view: GraphView, backend: Policy, config: QuantConfig) -> None:
        self.view = view
        self.backend = backend
        self.config = config
        self.ann = Annotations()
        self.declined: dict[fx.Node, str] = {}

    # ---- queries -----------------------------------------------------------------------------------
    def kind(self, node: fx.Node) -> str:
        return self.view.kinds[node]

    def is_activation(self, node: object) -> bool:
        """A floating-point tensor computed from the inputs (not a parameter, constant or shape value)."""
        if not isinstance(node, fx.Node) or node.op == "get_attr":
            return False
        meta = node.meta.get("tensor_meta")
        return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point

    def activation_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The distinct activation tensors ``node`` reads, in argument order (lists such as cat's flattened)."""
        # weighted ops read their weight and bias as parameters (module) or constant arguments (functional)
        args = node.args[:1] if self.kind(node) in WEIGHTED_KINDS else node.args
        flat: list[fx.Node] = []
        fx.node.map_arg(args, lambda n: flat.append(n) if n not in flat and self.is_activation(n) else None)
        return flat

    def owner_names(self, node: fx.Node) -> list[tuple[str, str]]:
        """(qualified name, class name) pairs that override globs are matched against for ``node``: the module it
        calls, the modules whose forward it runs in (an ``F.conv2d`` inside a ``Conv2dSame``, every op of
        ``layer4``: tracing's ``nn_module_stack``, the root left out), and its node name."""
        names = [(node.name, node.name)]
        if node.op == "call_module":
            names.insert(0, (node.target, type(self.view.modules[node.target]).__name__))
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                names.append((path, cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2]))
        return names

    def _overrides(self, node: fx.Node):
        for ov in self.config.overrides:
            if any(fnmatch.fnmatchcase(name, ov.pattern) or fnmatch.fnmatchcase(cls, ov.pattern)
                   for name, cls in self.owner_names(node)):
                yield ov

    def excluded(self, node: fx.Node) -> str | None:
        """The reason ``node`` must stay float per the config, or None."""
        reason = None
        for ov in self._overrides(node):  # later entries win
            reason = f"excluded by Override({ov.pattern!r})" if ov.exclude else None
        return reason

    def spec(self, node: fx.Node, role: str) -> QuantSpec:
        """The spec for ``role`` ("weight" or "activation") at ``node``: backend default, config, overrides."""
        spec = getattr(self.config, role) or getattr(self.backend, role)
        for ov in self._overrides(node):
            spec = getattr(ov, role) or spec
        if role == "weight" and spec.axis is not None:
            spec = replace(spec, axis=WEIGHT_AXIS.get(self.kind(node), 0))
        return spec

    # ---- annotations -------------------------------------------------------------------------------
    def request_input(self, user: fx.Node, value: fx.Node, rule: str, role: str = "activation",
                      spec: QuantSpec | None = None) -> int:
        """Targets ``value`` where it enters ``user`` (with ``spec``, or the spec in force for ``role`` at
        ``user``); returns the request's index."""
        self.ann.requests.append(Request(value, user, spec or self.spec(user, role), rule))
        return len(self.ann.requests) - 1

    def request_output(self, node: fx.Node, rule: str) -> int:
        """Targets the output of ``node`` for all of its users; returns the request's index."""
        self.ann.requests.append(Request(node, None, self.spec(node, "activation"), rule))
        return len(self.ann.requests) - 1

    def mark(self) -> tuple[int, int, int, frozenset]:
        """Where the annotations stand now, for ``rollback``."""
        a = self.ann
        return len(a.requests), len(a.shares), len(a.shared_values), frozenset(a.weights)

    def rollback(self, mark: tuple[int, int, int, frozenset]) -> None:
        """Undo what a declined match annotated since ``mark``."""
        requests, shares, shared_values, weights = mark
        a = self.ann
        del a.requests[requests:], a.shares[shares:], a.shared_values[shared_values:]
        for node in [n for n in a.weights if n not in weights]:
            del a.weights[node]

    def share(self, indices: list[int]) -> None:
        """The requests at ``indices`` share one quantizer (one scale)."""
        self.ann.shares.extend(itertools.pairwise(indices))

    def share_values(self, values: list[fx.Node]) -> None:
        """Whatever quantizers these tensors end up with share one scale (requests from any rule)."""
        self.ann.shared_values.append(tuple(values))

    def quantize_weight(self, node: fx.Node, rule: str) -> None:
        """Give the weighted op ``node`` (a Conv/Linear module, or F.conv*/F.linear of a constant) the weight spec."""
        spec = self.spec(node, "weight")
        if node.op == "call_module":
            self.ann.weights[node] = (spec, rule)
        elif (weight := parameter_arg(self.view.gm, node)) is not None:
            self.request_input(node, weight, rule, role="weight")
        else:
            raise PassError(f"rule `{rule}`: `{node.name}` has no constant weight to quantize")
