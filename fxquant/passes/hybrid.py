"""The parts of a prepared model that are not traced graphs: notes on traced parts, and eager code.

A fully traceable model is one traced part at the root. Otherwise the prepared model is the model's own (copied)
module tree with each traced part replaced by its prepared GraphModule (``fxquant.pipeline``) and each
Conv/Linear called from eager code replaced by its quantized twin (here); the report lists what ran eagerly
and why.
"""

from __future__ import annotations

from torch import nn

from fxquant.backends.base import Backend
from fxquant.capture.partition import Partition, TracedPart
from fxquant.ops.kinds import module_kind
from fxquant.passes.eager_quant import swap_layer
from fxquant.report import OpEntry, PrepareReport
from fxquant.spec import QuantConfig


def part_notes(part: TracedPart) -> list[str]:
    """A note naming the arguments a traced part was specialized on, if any."""
    if not part.fixed:
        return []
    where = f"`{part.path}`" if part.path else "the root"
    args = ", ".join(f"{k}={v!r}" for k, v in part.fixed.items())
    return [f"{where} was traced with {args} (the values it was called with); other values raise at run time"]


def quantize_eager_code(work: nn.Module, parts: Partition, backend: Backend, config: QuantConfig,
                        report: PrepareReport) -> None:
    """Swap the Conv/Linear layers eager code calls for quantized twins and report every eager module."""
    report.eager = [OpEntry(path, cls, reason) for path, cls, reason in parts.eager]
    for path, layer_inputs in parts.swaps:
        quantized, entry = swap_layer(work, path, layer_inputs, backend, config)
        (report.quantized if quantized else report.float_ops).append(entry)
    for path, module in parts.eager_float:
        kind = module_kind(module)
        if kind in backend.passthrough:
            report.passthrough.append(OpEntry(path, kind, "pass-through (eager code)"))
        else:
            report.float_ops.append(OpEntry(path, kind, "called from eager code (not traced)"))
    report.notes += parts.notes
    report.notes += [f"`{path}` is never called on the example inputs: not quantized" for path in parts.uncalled]
