"""A deployment backend: default specs, placement rules and pass-through kinds, declared as data."""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.rules import Rule
from fxquant.spec import QuantSpec


@dataclass(frozen=True)
class Backend:
    """Placement policy for one runtime.

    passthrough: kinds that need no quantizer of their own on this backend (the runtime fuses them or runs
    them on quantized data); they are not reported as float.
    """

    name: str
    description: str
    weight: QuantSpec
    activation: QuantSpec
    rules: tuple[Rule, ...]
    passthrough: frozenset[str]
