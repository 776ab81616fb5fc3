"""Annotate: run a backend's rules over the graph and record which tensors get which spec.

Contract: the graph is not changed. The result (``Annotations``) lists quantization requests on tensors
(at a producer for all users, or on the edge into one user), weight specs of weighted ops, groups of requests
that share one scale, and, for every op left in float, the reason.
"""

from __future__ import annotations

import logging

from torch import fx

from fxquant.backends.runtime import dynamic_decline
from fxquant.passes.manager import PassResult
from fxquant.provenance import info, read
from fxquant.rules import GraphView, Match, Rule, ordered
from fxquant.rules.context import Annotations, Policy, RuleContext
from fxquant.spec import QuantConfig

log = logging.getLogger("fxquant.annotate")
NON_OPS = frozenset({"placeholder", "output", "constant"})


def _apply(rule: Rule, match: Match, ctx: RuleContext) -> str | None:
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


def annotate(view: GraphView, backend: Policy, config: QuantConfig) -> Annotations:
    """Run the backend's rules (and the config's extra rules) by priority and collect their annotations."""
    ctx = RuleContext(view, backend, config)
    claimed: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(view.kinds)}
    for rule in ordered(backend.rules):
        for match in view.match(rule.pattern):
            nodes = list(match.values())
            if any(n in claimed or not _computes_float(n) for n in nodes):
                continue  # integer/bool ops (shape arithmetic, attention masks) have nothing to quantize
            reason = next((r for n in nodes if (r := ctx.excluded(n))), None)
            for check in rule.checks:
                reason = reason or check(match, ctx)
            n_requests = len(ctx.ann.requests)
            mark = ctx.mark()
            reason = reason or _apply(rule, match, ctx)
            reason = reason or _no_dynamic_kernel(ctx, n_requests, backend)
            if reason is not None:
                ctx.rollback(mark)
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
                record = info(n)
                record.rule, record.unit = f"{backend.name}.{rule.name}", unit
    for n, kind in view.kinds.items():
        if n in claimed or kind in NON_OPS or not _computes_float(n):
            continue
        if (kind in backend.passthrough and n not in ctx.declined) or read(n).pad_merged_into:
            ctx.ann.passthrough.append(n)
        else:
            ctx.ann.floats[n] = ctx.excluded(n) or ctx.declined.get(n) or backend.float_reasons.get(kind) or (
                f"no {backend.name} rule quantizes `{kind}` ops" if kind != "other"
                else f"no {backend.name} rule knows `{_target_name(n)}`")
    return ctx.ann


def _no_dynamic_kernel(ctx: RuleContext, first: int, backend: Policy) -> str | None:
    """Why the match's dynamically quantized inputs would feed an op with no dynamic kernel in the backend's
    runtime (which then runs in float between a quantize and a dequantize), or None."""
    runtime = getattr(backend, "runtime", None)
    for request in ctx.ann.requests[first:]:
        if request.user is not None and (why := dynamic_decline(request.spec, ctx.kind(request.user), runtime)):
            return why
    return None


def _computes_float(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def annotate_pass(gm: fx.GraphModule, backend: Policy, config: QuantConfig) -> PassResult[Annotations]:
    """The pass form: the graph is unchanged; the product is the annotations the insertion pass acts on."""
    return PassResult(gm, modified=False, product=annotate(GraphView(gm), backend, config))

