"""Rules: a pattern, a check that may decline with a reason, and what to quantize — declared as data.

A rule only *annotates* (which tensors get which spec, which quantizers share a scale); the one generic
insertion pass (fxquant.passes.insert) acts on the annotations. Rules run by descending priority; a node
claimed by one rule is not matched by a later one, so "conv -> relu" can take precedence over "conv".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fxquant.errors import ConfigError, ConfigTypeError
from fxquant.ops import kinds as ops
from fxquant.ops.kinds import WEIGHTED_KINDS
from fxquant.rules.context import RuleContext
from fxquant.rules.pattern import Match, Pattern

Check = Callable[[Match, RuleContext], "str | None"]
"""A rule's legality check: None accepts the match, a string declines it with that reason."""
Handler = Callable[[Match, RuleContext], "str | None"]
"""A rule's action in code: annotate through the context, return None, or a reason to decline."""


@dataclass(frozen=True)
class Targets:
    """What a declarative rule quantizes (``Rule(name, pattern, quantize=Targets(...))``); each field names a
    pattern node.

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
    quantize: Targets | None = None
    handler: Handler | None = None
    checks: tuple[Check, ...] = ()
    priority: int = 0

    def __post_init__(self) -> None:
        if (self.quantize is None) == (self.handler is None):
            raise ConfigError(f"Rule {self.name!r} needs exactly one of quantize=Targets(...) or handler=...")
        if not isinstance(self.pattern, Pattern):
            raise ConfigTypeError(f"Rule {self.name!r}: pattern must be a Pattern, "
                                  "e.g. Pattern.chain(('conv', 'conv'))")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigTypeError(f"Rule name must be a non-empty string, got {self.name!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigTypeError(f"Rule {self.name!r}: priority must be an int (higher runs first), "
                                  f"got {self.priority!r}")
        if self.quantize is not None and not isinstance(self.quantize, Targets):
            raise ConfigTypeError(f"Rule {self.name!r}: quantize must be a Targets(...), "
                                  f"got {type(self.quantize).__name__}")
        if self.handler is not None and not callable(self.handler):
            raise ConfigTypeError(f"Rule {self.name!r}: handler must be a function (match, ctx) -> reason or None")
        if not isinstance(self.checks, tuple) or not all(callable(c) for c in self.checks):
            raise ConfigTypeError(f"Rule {self.name!r}: checks must be a tuple of functions "
                                  "(match, ctx) -> reason or None")
        names = set(self.pattern.names)
        if self.quantize is not None:
            for fld in ("inputs", "weight", "output"):
                ref = getattr(self.quantize, fld)
                if ref is not None and ref not in names:
                    raise ConfigError(f"Rule {self.name!r}: Targets.{fld}={ref!r} is not a pattern node "
                                      f"(pattern nodes: {sorted(names)})")
            if self.quantize.weight is not None:
                kinds = dict(self.pattern.nodes)[self.quantize.weight]
                if all(isinstance(k, str) for k in kinds) and not kinds <= WEIGHTED_KINDS:
                    raise ConfigError(f"Rule {self.name!r}: Targets.weight={self.quantize.weight!r} can only name a "
                                      f"node of kinds {sorted(WEIGHTED_KINDS)}, not {sorted(kinds - WEIGHTED_KINDS)}")


def ordered(rules: Iterable[Rule]) -> list[Rule]:
    """Rules by descending priority; declaration order breaks ties. Names must be unique."""
    rules = list(rules)
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ConfigError(f"two rules are named {r.name!r}; rule names must be unique")
        seen.add(r.name)
    return sorted(rules, key=lambda r: -r.priority)


def single_user(*names: str) -> Check:
    """Check: each named node's output is used by exactly one node (so it can be fused with it)."""

    def check(match: Match, ctx: RuleContext) -> str | None:
        for name in names:
            users = len(match[name].users)
            if users != 1:
                return f"`{match[name].name}` has {users} users, so it cannot be fused with the next op"
        return None

    return check



def known_kinds() -> set[str]:
    """Every op-kind name fxquant gives nodes (fxquant.ops.kinds), plus "other" for ops it does not know."""
    return {*ops.MODULE_KINDS.values(), *ops.FUNCTION_KINDS.values(), *ops.METHOD_KINDS.values(), "other"}


def check_rules(rules: object, where: str) -> tuple[Rule, ...]:
    """Validate user rules: a tuple of Rule with unique names, integer priorities and known kind names."""
    if isinstance(rules, Rule) or not isinstance(rules, (tuple, list)):
        raise ConfigTypeError(f"{where} must be a tuple of fxquant.Rule, got {type(rules).__name__}")
    rules = tuple(rules)
    kinds = known_kinds()
    seen: set[str] = set()
    for r in rules:
        if not isinstance(r, Rule):
            raise ConfigTypeError(f"{where} holds a {type(r).__name__}; build rules with "
                                  "fxquant.Rule(name, pattern, ...)")
        if r.name in seen:
            raise ConfigError(f"{where}: two rules are named {r.name!r}; rule names must be unique")
        seen.add(r.name)
        unknown = sorted(r.pattern.kind_names() - kinds)
        if unknown:
            hints = {k: difflib.get_close_matches(k, kinds, n=1) for k in unknown}
            shown = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ConfigError(f"rule {r.name!r} uses unknown op kind(s) {shown}; known kinds: {sorted(kinds)}. "
                              "To match a module class or a function, put the class or function itself in the pattern")
    return rules
