"""Passes are values: each takes a GraphModule and returns a PassResult; the runner lints after each pass and
names the pass that failed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from torch import fx

from fxquant.errors import FxQuantError, PassError

T = TypeVar("T")


@dataclass
class PassResult(Generic[T]):
    """What a pass returns: the (possibly new) GraphModule, whether it changed anything, notes on what it
    skipped and why, and its product (what later passes or the report need: annotations, a PTQ report...)."""

    gm: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)
    product: T | None = None


Pass = Callable[..., PassResult]


class PassRunner:
    """Runs passes one at a time on one GraphModule: ``product = run(pass_fn, *args)`` calls
    ``pass_fn(gm, *args)``, lints and recompiles the graph, keeps the notes and returns the pass's product."""

    def __init__(self, gm: fx.GraphModule, observer: Callable[[str, fx.GraphModule], None] | None = None) -> None:
        self.gm = gm
        self.notes: list[str] = []
        self.ran: list[str] = []
        self.observer = observer  # called after each pass (name, graph): docs/architecture.md is made with it

    def __call__(self, fn: Pass, *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", repr(fn))
        try:
            result = fn(self.gm, *args, **kwargs)
            result.gm.graph.lint()
            result.gm.recompile()
        except FxQuantError:
            raise
        except (ValueError, TypeError) as exc:
            raise PassError(f"pass `{name}`: {exc}") from exc
        except Exception as exc:
            raise PassError(f"pass `{name}` failed: {type(exc).__name__}: {exc}") from exc
        self.gm = result.gm
        self.notes += result.notes
        self.ran.append(name)
        if self.observer is not None:
            self.observer(name, self.gm)
        return result.product
