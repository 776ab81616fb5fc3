"""A small pass manager: runs passes in order, lints the graph after each, names the pass that failed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import fx

from fxquant.errors import FxQuantError, PassError


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) GraphModule and whether it changed anything."""

    gm: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)


Pass = Callable[[fx.GraphModule], PassResult]


def run_passes(gm: fx.GraphModule, passes: Sequence[tuple[str, Pass]]) -> tuple[fx.GraphModule, dict[str, PassResult]]:
    """Run ``passes`` (name, callable) in order; returns the final module and each pass's result."""
    results: dict[str, PassResult] = {}
    for name, fn in passes:
        try:
            result = fn(gm)
            result.gm.graph.lint()
            result.gm.recompile()
        except FxQuantError:
            raise
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"pass `{name}`: {exc}") from exc
        except Exception as exc:
            raise PassError(f"pass `{name}` failed: {type(exc).__name__}: {exc}") from exc
        results[name] = result
        gm = result.gm
    return gm, results
