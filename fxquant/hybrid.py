"""Assemble a prepared model from its parts: traced units through the graph pipeline, eager layers by swap.

A fully traceable model is one unit at the root and comes back as one GraphModule, exactly as before. Otherwise
the result is the model's own (copied) module tree with each traced part replaced by its prepared GraphModule
and each Conv/Linear called from eager code replaced by its quantized twin; the report merges all of them
and lists what ran eagerly and why.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from fxquant.backends.base import Backend
from fxquant.eager_quant import swap_layer
from fxquant.errors import ExampleInputError, PassError
from fxquant.ops import module_kind
from fxquant.partition import Partition, Unit, partition
from fxquant.quantizer import TensorQuantizer
from fxquant.report import OpEntry, PrepareReport
from fxquant.spec import QuantConfig
from fxquant.state import QuantState

PrepareGraph = Callable[[fx.GraphModule, tuple], tuple[fx.GraphModule, PrepareReport]]


def _fixed_note(unit: Unit) -> str | None:
    shown = unit.fixed
    if not shown:
        return None
    where = f"`{unit.path}`" if unit.path else "the root"
    args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return f"{where} was traced with {args} (the values it was called with); other values raise at run time"


def _prepare_unit(unit: Unit, prepare_graph: PrepareGraph) -> tuple[fx.GraphModule, PrepareReport]:
    try:
        return prepare_graph(unit.gm, unit.inputs)
    except ExampleInputError as exc:
        if not unit.path:
            raise
        raise PassError(f"the traced `{unit.path}` failed on the inputs it was called with ({exc}); keep it eager "
                        f"with QuantConfig(non_traceable=({unit.path!r},))") from exc


def prepare_parts(work: nn.Module, inputs: tuple, backend: Backend, config: QuantConfig,
                  prepare_graph: PrepareGraph) -> tuple[nn.Module, PrepareReport]:
    """Partition ``work`` (a copy the caller owns), prepare every part; returns (prepared root, report)."""
    parts: Partition = partition(work, inputs, config)
    root: nn.Module = work
    report = PrepareReport(backend.name)
    for unit in parts.units:
        gm, unit_report = _prepare_unit(unit, prepare_graph)
        if unit.path:
            work.set_submodule(unit.path, gm)
        else:
            root = gm
        report.absorb(unit_report, unit.path)
        report.traced.append(unit.path)
        note = _fixed_note(unit)
        if note:
            report.notes.append(note)
    report.eager = [OpEntry(path, cls, reason) for path, cls, reason in parts.eager]
    for path, layer_inputs in parts.swaps:
        entry = swap_layer(work, path, layer_inputs, backend, config)
        (report.quantized if entry.detail.endswith("module swap)") else report.float_ops).append(entry)
    for path, module in parts.eager_float:
        kind = module_kind(module)
        if kind in backend.passthrough:
            report.passthrough.append(OpEntry(path, kind, "pass-through (eager code)"))
        else:
            report.float_ops.append(OpEntry(path, kind, "called from eager code (not traced)"))
    report.notes += parts.notes
    report.notes += [f"`{path}` is never called on the example inputs: not quantized" for path in parts.uncalled]
    quantizers = [m for m in root.modules() if isinstance(m, TensorQuantizer)]
    report.weight_quantizers = sum(1 for q in quantizers if q.constant)
    report.activation_quantizers = len(quantizers) - report.weight_quantizers
    return root, report


def attach_state(root: nn.Module, state: QuantState) -> None:
    """Record fxquant's state on the prepared model (``root.meta['fxquant']``; eager roots get a ``meta`` dict)."""
    meta = getattr(root, "meta", None)
    if meta is None:
        root.meta = meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"the model has a `meta` attribute of type {type(meta).__name__}, where fxquant keeps its "
                        "state on models it cannot trace whole; rename that attribute")
    meta["fxquant"] = state
