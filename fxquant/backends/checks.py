"""Checks shared by the backends' rules; each returns None to accept or the reason to decline."""

from __future__ import annotations

from fxquant.passes.annotate import AnnotationContext
from fxquant.quant_modules import has_quant_form
from fxquant.rules import Match
from fxquant.rules.rule import Check


def quantizable_weight(name: str) -> Check:
    """The weighted op has a weight fxquant can quantize (a known module type or a constant argument)."""

    def check(match: Match, ctx: AnnotationContext) -> str | None:
        node = match[name]
        if node.op == "call_module":
            module = ctx.view.modules[node.target]
            if not has_quant_form(module):
                return f"`{node.target}` is a {type(module).__name__}, a subclass with no quantized form"
            return None
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if getattr(weight, "op", None) != "get_attr":
            return f"`{node.name}` takes its weight from a computed tensor, not a parameter"
        return None

    return check


def two_activation_inputs(name: str) -> Check:
    """The op combines two activation tensors (not an activation and a constant)."""

    def check(match: Match, ctx: AnnotationContext) -> str | None:
        n = len(ctx.activation_inputs(match[name]))
        return None if n == 2 else f"`{match[name].name}` combines {n} activation tensor(s) with constants"

    return check
