"""The rule machinery and the rule-writer API: op-kind patterns, the networkx matcher, placement rules, and
the context a rule's checks and handlers receive (``RuleContext``)."""

from fxquant.rules.context import Annotations, Policy, Request, RuleContext
from fxquant.rules.pattern import GraphView, Match, Pattern
from fxquant.rules.rule import Check, Handler, Rule, Targets, ordered, single_user

__all__ = [
           "Annotations",
           "Check",
           "GraphView",
           "Handler",
           "Match",
           "Pattern",
           "Policy",
           "Request",
           "Rule",
           "RuleContext",
           "Targets",
           "ordered",
           "single_user",
]
