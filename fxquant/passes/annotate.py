"""Annotate: run a backend's rules over the graph and record which tensors get which spec.

Contract: the graph is not changed. The result (``Annotations``) lists quantization requests on tensors
(at a producer for all users, or on the edge into one user), weight specs of weighted ops, groups of requests
that share one scale, and, for every op left in float, the reason.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import fx

from fxquant.errors import PassError
from fxquant.ops import WEIGHT_AXIS, WEIGHTED_KINDS, parameter_arg
from fxquant.passes.manager import PassResult
from fxquant.rules import GraphView, Match, Rule, ordered
from fxquant.spec import QuantConfig, QuantSpec

if TYPE_CHECKING:
    from fxquant.backends.base import Backend

log = logging.getLogger("fxquant.annotate")
NON_OPS = frozenset({"placeholder", "output", "constant"})


@dataclass
class Request:
    """Quantize ``value`` with ``spec``: for all its users (``user`` None) or on the edge into ``user``."""

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


class AnnotationContext:
    """What a rule's checks and handlers see: the graph view, the specs, and the calls that annotate."""

    def __init__(self, view: GraphView, backend: Backend, config: QuantConfig) -> None:
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
        """(qualified name, class name) pairs that override globs are matched against for ``node``."""
        names = [(node.name, node.name)]
        if node.op == "call_module":
            names.insert(0, (node.target, type(self.view.modules[node.target]).__name__))
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
    def request_input(self, user: fx.Node, value: fx.Node, rule: str, role: str = "activation") -> int:
        """Quantize ``value`` where it enters ``user``; returns the request's index."""
        self.ann.requests.append(Request(value, user, self.spec(user, role), rule))
        return len(self.ann.requests) - 1

    def request_output(self, node: fx.Node, rule: str) -> int:
        """Quantize the output of ``node`` for all of its users; returns the request's index."""
        self.ann.requests.append(Request(node, None, self.spec(node, "activation"), rule))
        return len(self.ann.requests) - 1

    def share(self, indices: list[int]) -> None:
        """The requests at ``indices`` share one quantizer (one scale)."""
        self.ann.shares.extend(itertools.pairwise(indices))

    def share_values(self, values: list[fx.Node]) -> None:
        """Whatever quantizers these tensors end up with share one scale (requests from any rule)."""
        self.ann.shared_values.append(tuple(values))

    def quantize_weight(self, node: fx.Node, rule: str) -> None:
        spec = self.spec(node, "weight")
        if node.op == "call_module":
            self.ann.weights[node] = (spec, rule)
        elif (weight := parameter_arg(self.view.gm, node)) is not None:
            self.request_input(node, weight, rule, role="weight")
        else:
            raise PassError(f"rule `{rule}`: `{node.name}` has no constant weight to quantize")


def _apply(rule: Rule, match: Match, ctx: AnnotationContext) -> str | None:
    if rule.handler is not None:
        return rule.handler(match, ctx)
    q = rule.quantize
    indices: list[int] = []
    if q.inputs is not None:
        user = match[q.inputs]
        indices += [ctx.request_input(user, v, rule.name) for v in ctx.activation_inputs(user)]
    if q.weight is not None:
        ctx.quantize_weight(match[q.weight], rule.name)
    if q.output is not None:
        indices.append(ctx.request_output(match[q.output], rule.name))
    if q.share:
        ctx.share(indices)
    return None


def annotate(view: GraphView, backend: Backend, config: QuantConfig) -> Annotations:
    """Run the backend's rules (and the config's extra rules) by priority and collect their annotations."""
    ctx = AnnotationContext(view, backend, config)
    claimed: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(view.kinds)}
    for rule in ordered(backend.rules):
        for match in view.match(rule.pattern):
            nodes = list(match.values())
            if any(n in claimed for n in nodes):
                continue
            reason = next((r for n in nodes if (r := ctx.excluded(n))), None)
            for check in rule.checks:
                reason = reason or check(match, ctx)
            n_requests = len(ctx.ann.requests)
            reason = reason or _apply(rule, match, ctx)
            if reason is not None:
                del ctx.ann.requests[n_requests:]
                log.debug("rule %s declined %s: %s", rule.name, [n.name for n in nodes], reason)
                for n in nodes:
                    ctx.declined.setdefault(n, reason)
                continue
            claimed.update(nodes)
            unit = min(nodes, key=order.__getitem__).name  # one quantized unit, named after its first node
            for request in ctx.ann.requests[n_requests:]:
                request.unit = unit
            for n in nodes:
                ctx.ann.quantized[n] = rule.name
                n.meta.setdefault("fxquant", {}).update(rule=f"{backend.name}.{rule.name}", unit=unit)
    for n, kind in view.kinds.items():
        if n in claimed or kind in NON_OPS or not _computes_float(n):
            continue
        if kind in backend.passthrough and n not in ctx.declined:
            ctx.ann.passthrough.append(n)
        else:
            ctx.ann.floats[n] = ctx.excluded(n) or ctx.declined.get(n) or backend.float_reasons.get(kind) or (
                f"no {backend.name} rule quantizes `{kind}` ops" if kind != "other"
                else f"no {backend.name} rule knows `{_target_name(n)}`")
    return ctx.ann


def _computes_float(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def annotate_pass(gm: fx.GraphModule, backend: Backend, config: QuantConfig) -> PassResult:
    """Pass wrapper: annotations land in ``gm.meta['fxquant_annotations']``; the graph is unchanged."""
    gm.meta["fxquant_annotations"] = annotate(GraphView(gm), backend, config)
    return PassResult(gm, modified=False)

