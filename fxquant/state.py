"""What fxquant records on the models it returns (``gm.meta['fxquant']``)."""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.report import PrepareReport
from fxquant.spec import QuantConfig


@dataclass
class QuantState:
    """Backend, config and stage of a model made by fxquant, plus the prepare report."""

    backend: str
    config: QuantConfig
    stage: str
    report: PrepareReport


def get_state(model: object) -> QuantState | None:
    """The QuantState of a model returned by prepare/convert, or None."""
    meta = getattr(model, "meta", None)
    state = meta.get("fxquant") if isinstance(meta, dict) else None
    return state if isinstance(state, QuantState) else None
