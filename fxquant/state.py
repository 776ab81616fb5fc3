"""What fxquant records on the models it returns (``model.meta['fxquant']``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from fxquant.backends.base import Backend
from fxquant.errors import CalibrationError, ModelError
from fxquant.report import PrepareReport
from fxquant.spec import QuantConfig


@dataclass
class QuantState:
    """The backend (the object itself, custom ones included), config and stage of a model made by fxquant,
    the prepare report, the weight quantizers whose ranges AdaRound fixed (calibrate leaves them alone), prepare's
    example inputs and, for a model converted with ``exact=``, what the exact model was made from."""

    backend: Backend
    config: QuantConfig
    stage: str
    report: PrepareReport
    fixed_weights: set[str] = field(default_factory=set)
    example_inputs: tuple = ()  # prepare's example (convert(exact=...) exports with it)
    exact: object = None  # an exact model's ExactInfo (fxquant.lower.exact.model): its target and fake-quant twin
    busy: str | None = field(default=None, compare=False)  # the call running on the model now (calibrate)


_CLAIM = threading.Lock()  # makes "is anyone calibrating this model?" and "now I am" one step


@contextlib.contextmanager
def exclusive(state: QuantState, call: str) -> Iterator[None]:
    """Run ``call`` on the model alone: a second call while it runs (another thread) raises CalibrationError
    instead of mixing its statistics into the first one's."""
    with _CLAIM:
        if state.busy is not None:
            raise CalibrationError(f"{call} was called while {state.busy} runs on this model (another thread): two "
                                   "calibrations of one model would mix their statistics into ranges of neither data "
                                   "set. Calibrate one prepared model at a time, or prepare one model per thread")
        state.busy = call
    try:
        yield
    finally:
        state.busy = None


def get_state(model: object) -> QuantState | None:
    """The QuantState of a model returned by prepare/convert, or None."""
    meta = getattr(model, "meta", None)
    state = meta.get("fxquant") if isinstance(meta, dict) else None
    return state if isinstance(state, QuantState) else None


def attach_state(root: object, state: QuantState) -> None:
    """Record ``state`` on a prepared model (``root.meta['fxquant']``; eager roots get a ``meta`` dict)."""
    meta = getattr(root, "meta", None)
    if meta is None:
        root.meta = meta = {}
    if not isinstance(meta, dict):
        raise ModelError(f"the model has a `meta` attribute of type {type(meta).__name__}, where fxquant keeps "
                         "its state on models it cannot trace whole; rename that attribute")
    meta["fxquant"] = state
