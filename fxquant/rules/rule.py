"""Rules: a pattern, a check that may decline with a reason, and what to quantize — declared as data.

A rule only *annotates* (which tensors get which spec, which quantizers share a scale); the one generic
insertion pass (fxquant.passes.insert) acts on the annotations. Rules run by descending priority; a node
claimed by one rule is not matched by a later one, so "conv -> relu" can take precedence over "conv".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fxquant.rules.pattern import Match, Pattern

if TYPE_CHECKING:
    from fxquant.passes.annotate import AnnotationContext

Check = Callable[[Match, "AnnotationContext"], "str | None"]
Handler = Callable[[Match, "AnnotationContext"], "str | None"]


@dataclass(frozen=True)
class Quantize:
    """The declarative action of a rule; each field names a pattern node.

    inputs: its activation inputs get activation quantizers (on the edges into it).
    weight: its weight gets the weight spec (a Conv/ConvTranspose/Linear module, or the constant weight
        argument of F.conv*/F.linear).
    output: its output gets an activation quantizer, shared by all its users.
    share: the input and output quantizers of the rule share one scale (concat, max-pool, reshape).
    """

    inputs: str | None = None
    weight: str | None = None
    output: str | None = None
    share: bool = False


@dataclass(frozen=True)
class Rule:
    """One placement rule. Exactly one of ``quantize`` (data) or ``handler`` (code) says what it does.

    ``check(match, ctx)`` and ``handler(match, ctx)`` return None to accept, or a reason string to decline;
    a declined match claims nothing and the reason is logged (and reported when no rule takes the node).
    """

    name: str
    pattern: Pattern
    quantize: Quantize | None = None
    handler: Handler | None = None
    checks: tuple[Check, ...] = ()
    priority: int = 0

    def __post_init__(self) -> None:
        if (self.quantize is None) == (self.handler is None):
            raise ValueError(f"Rule {self.name!r} needs exactly one of quantize=Quantize(...) or handler=...")
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"Rule {self.name!r}: pattern must be a Pattern, e.g. Pattern.chain(('conv', 'conv'))")
        names = set(self.pattern.names)
        if self.quantize is not None:
            for fld in ("inputs", "weight", "output"):
                ref = getattr(self.quantize, fld)
                if ref is not None and ref not in names:
                    raise ValueError(f"Rule {self.name!r}: Quantize.{fld}={ref!r} is not a pattern node "
                                     f"(pattern nodes: {sorted(names)})")


def ordered(rules: Iterable[Rule]) -> list[Rule]:
    """Rules by descending priority; declaration order breaks ties. Names must be unique."""
    rules = list(rules)
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ValueError(f"two rules are named {r.name!r}; rule names must be unique")
        seen.add(r.name)
    return sorted(rules, key=lambda r: -r.priority)


def single_user(*names: str) -> Check:
    """Check: each named node's output is used by exactly one node (so it can be fused with it)."""

    def check(match: Match, ctx: AnnotationContext) -> str | None:
        for name in names:
            users = len(match[name].users)
            if users != 1:
                return f"`{match[name].name}` has {users} users, so it cannot be fused with the next op"
        return None

    return check

