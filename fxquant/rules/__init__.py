"""Pattern machinery: op-kind patterns, the networkx matcher, and placement rules."""

from fxquant.rules.pattern import GraphView, Match, Pattern
from fxquant.rules.rule import Quantize, Rule, ordered, single_user

__all__ = ["GraphView", "Match", "Pattern", "Quantize", "Rule", "ordered", "single_user"]
