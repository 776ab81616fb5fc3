"""Per-layer sensitivity: which quantized layers hurt, measured on a calibrated prepared model.

A *layer* is one quantized unit: one match of a backend rule (a Conv with its input and weight quantizers, a
Conv+ReLU with its output quantizer, a residual add with its skip quantizer, ...), named after its first node
and listed in topological order. Every quantizer records the units that asked for it (``node.meta``); a
quantizer is active when at least one active unit asked for it, which is exactly what excluding the other
units with ``Override(pattern, exclude=True)`` would leave. The analysis switches quantizers between
``quant`` and ``disabled`` on the calibrated model itself: nothing is re-prepared or re-calibrated.

For each layer it measures the SQNR (dB) against the float model of
- the model output with only that layer quantized (``model_only_db``: the ranking key),
- the model output with that layer and every earlier one quantized (``model_cumulative_db``),
- the layer's own output, in both settings (``output_only_db``, ``output_cumulative_db``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from fxquant.analysis.sensitivity_report import LayerSensitivity, SensitivityReport
from fxquant.capture.trace import normalize_inputs
from fxquant.errors import CalibrationError, ConfigTypeError
from fxquant.metrics import SqnrAccumulator
from fxquant.provenance import read
from fxquant.ptq.input_means import shifted_layers
from fxquant.quantizer import TensorQuantizer, quantizers_of
from fxquant.spec import Override
from fxquant.state import get_state


@dataclass(frozen=True)
class QuantUnit:
    """One quantized unit: its name (module path, or node name for functional ops), the fx node it starts
    at, its op kind, the TensorQuantizer modules it asks for, and the fx node holding its output."""

    name: str
    node: str
    kind: str
    quantizers: tuple[str, ...]
    output_node: str

    @property
    def pattern(self) -> str:
        """An ``Override`` glob that matches exactly this layer (glob characters escaped)."""
        return "".join(f"[{c}]" if c in "*?[]" else c for c in self.name)


# ---- layers -------------------------------------------------------------------------------------------
def quantized_units(prepared: fx.GraphModule) -> list[QuantUnit]:
    """The quantized units of a prepared model, in topological order, with the quantizers each asks for."""
    state = get_state(prepared)
    if state is None or state.stage == "converted":
        raise ConfigTypeError("quantized_units() takes the model returned by fxquant.prepare() (before convert)")
    if not isinstance(prepared, fx.GraphModule):
        raise ConfigTypeError("per-layer analysis needs a model torch.fx traced whole; this one was prepared in parts "
                              "(some code runs eagerly, see fxquant.report_of); keep layers float by hand with "
                              "Override(pattern, exclude=True)")
    nodes = list(prepared.graph.nodes)
    by_name = {n.name: n for n in nodes}
    order = {n.name: i for i, n in enumerate(nodes)}
    kinds = {e.node: e.kind for e in state.report.quantized}
    quantizers = quantizers_of(prepared)
    asked: dict[str, list[str]] = {}  # unit -> quantizer modules
    members: dict[str, list[fx.Node]] = {}  # unit -> its op nodes
    for n in nodes:
        record = read(n)
        if record.unit:
            members.setdefault(record.unit, []).append(n)
        if n.op != "call_module":
            continue
        if n.target in quantizers:  # an activation quantizer: every unit that asked for it
            units, target = (record.quantizer.units if record.quantizer else []), n.target
        elif f"{n.target}.weight_quantizer" in quantizers and record.unit:
            units, target = [record.unit], f"{n.target}.weight_quantizer"
        else:
            continue
        for unit in units:
            if target not in asked.setdefault(unit, []):
                asked[unit].append(target)
    layers = []
    for unit in sorted(asked, key=lambda u: order.get(u, len(nodes))):
        node = by_name.get(unit)
        name = node.target if node is not None and node.op == "call_module" else unit
        last = max(members.get(unit, [node] if node is not None else []), key=lambda m: order[m.name], default=None)
        out = _output_of(last, quantizers)
        layers.append(QuantUnit(name, unit, kinds.get(unit, "?"),
                            tuple(asked[unit]), out.name if out is not None else ""))
    return layers


def _output_of(last: fx.Node | None, quantizers: dict[str, TensorQuantizer]) -> fx.Node | None:
    """The value a unit hands on: its last node, or that node's output quantizer when it feeds only that."""
    if last is None:
        return None
    users = list(last.users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].target in quantizers:
        return users[0]
    return last


def layer_overrides(layers: Sequence[QuantUnit]):
    """``Override(pattern, exclude=True)`` for each layer: the config that keeps exactly these layers float."""
    return tuple(Override(layer.pattern, exclude=True) for layer in layers)


# ---- measurement --------------------------------------------------------------------------------------
class Probe:
    """Runs a prepared model as if only some layers (units) were quantized; returns its outputs and taps.

    ``configure(units)`` builds a GraphModule sharing the prepared model's modules in which each activation
    quantizer acts only on the edges that an active unit asked for (its other users read the float value) and
    weight quantizers of inactive units are disabled, with the bias their layer had before calibrate()'s bias
    correction (a shift that compensates a weight rounding no longer applied): what preparing with the other units
    excluded gives. ``restore()`` puts the original quantizer modes and biases back.
    """

    def __init__(self, prepared: fx.GraphModule, layers: Sequence[QuantUnit], batches: Iterable) -> None:
        self.prepared = prepared
        self.layers = list(layers)
        self.batches = [normalize_inputs(b) for b in batches]
        if not self.batches:
            raise CalibrationError("sensitivity needs at least one batch of data")
        self.quantizers = quantizers_of(prepared)
        self.modes = {name: q.mode for name, q in self.quantizers.items()}
        self.weight_units = {f"{n.target}.weight_quantizer": read(n).unit for n in prepared.graph.nodes
                             if n.op == "call_module" and f"{n.target}.weight_quantizer" in self.quantizers
                             and read(n).unit}
        self.was_training = prepared.training
        self.module: fx.GraphModule | None = None
        self.shifts = _bias_shifts(prepared, self.quantizers)
        self.unshifted: set[str] = set()

    def configure(self, units: Iterable[str], taps: bool = True) -> fx.GraphModule:
        """Targets as the units ``units`` ask (quantizers the user disabled stay disabled). The module
        returns ``(model output, layer outputs)``, or only the model output with ``taps=False``."""
        active = set(units)
        for name, q in self.quantizers.items():
            if name in self.weight_units:
                q.set_mode(self.modes[name] if self.weight_units[name] in active else "disabled")
        for name, (bias, shift, unit) in self.shifts.items():
            float_layer = unit not in active or self.modes[name] == "disabled"
            if float_layer != (name in self.unshifted):
                with torch.no_grad():
                    bias.add_(shift if float_layer else -shift)
                (self.unshifted.add if float_layer else self.unshifted.discard)(name)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        source: dict[fx.Node, fx.Node] = {}  # quantizer call -> the value it quantizes (in the new graph)
        outputs = []
        by_name = {}
        for n in self.prepared.graph.nodes:
            by_name[n.name] = n

            def lookup(a: fx.Node, user: fx.Node = n) -> fx.Node:
                return env[a] if a not in source or self._acts(a, user, active) else source[a]

            if n.op == "output":
                out = fx.node.map_arg(n.args[0], lookup)
                continue
            env[n] = graph.node_copy(n, lookup)
            if n.op == "call_module" and n.target in self.quantizers and read(n).quantizer is not None:
                source[n] = lookup(n.args[0])
        for layer in self.layers:
            node = by_name.get(layer.output_node)
            if node is not None and node in source and not any(self._acts(node, u, active) for u in node.users):
                outputs.append(source[node])
            else:
                outputs.append(env[node] if node is not None else None)
        graph.output((out, tuple(outputs)) if taps else out)
        self.module = fx.GraphModule(self.prepared, graph).eval()
        self.module.meta["fxquant"] = get_state(self.prepared)
        return self.module

    @staticmethod
    def _acts(quantizer: fx.Node, user: fx.Node, active: set[str]) -> bool:
        asks = read(quantizer).quantizer.asks
        return any(unit in active and (target is None or target == user.name) for unit, target in asks)

    @torch.no_grad()
    def run(self) -> list[tuple[list[torch.Tensor], tuple]]:
        """(model output leaves, layer outputs) per batch, as last configured."""
        results = []
        for batch in self.batches:
            out, taps = self.module(*batch)
            results.append(([t for t in tree_leaves(out) if isinstance(t, torch.Tensor)], taps))
        return results

    @torch.no_grad()
    def run_one(self, batch: tuple) -> list[torch.Tensor]:
        """The model output leaves for one batch, as last configured."""
        return [t for t in tree_leaves(self.module(*batch)[0]) if isinstance(t, torch.Tensor)]

    def restore(self) -> None:
        for name, q in self.quantizers.items():
            q.set_mode(self.modes[name])
        with torch.no_grad():
            for name in self.unshifted:
                bias, shift, _ = self.shifts[name]
                bias.sub_(shift)
        self.unshifted.clear()
        self.prepared.train(self.was_training)


def _bias_shifts(prepared: fx.GraphModule, quantizers: dict[str, TensorQuantizer]) -> dict[str, tuple]:
    """Weight quantizer name -> (its layer's bias, the shift calibrate()'s bias correction subtracted from it, the
    layer's unit)."""
    names = {id(q): name for name, q in quantizers.items()}
    return {names[id(layer.quantizer)]: (layer.bias, shift.to(layer.bias.dtype), read(layer.node).unit)
            for layer, shift in shifted_layers(prepared) if id(layer.quantizer) in names and read(layer.node).unit}


def _compare(reference: list, test: list, layer: int | None) -> tuple[float, float]:
    model_acc, out_acc = SqnrAccumulator(), SqnrAccumulator()
    for (ref_out, ref_taps), (out, taps) in zip(reference, test, strict=True):
        for r, t in zip(ref_out, out, strict=True):
            model_acc.add(r, t)
        if layer is not None and isinstance(ref_taps[layer], torch.Tensor):
            out_acc.add(ref_taps[layer], taps[layer])
    return model_acc.db, (out_acc.db if layer is not None and (out_acc.signal or out_acc.noise) else math.nan)


def sensitivity(prepared: fx.GraphModule, batches: Iterable, progress: bool = True) -> SensitivityReport:
    """Per-layer SQNR of a calibrated prepared model on ``batches`` (tensors or tuples of tensors).

    Runs 2 x (number of layers) + 2 forward passes over the batches; the model's quantizer modes are
    restored afterwards.
    """
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("sensitivity() takes a prepared model after fxquant.calibrate(prepared, batches)"
                               + ("" if state is None else f"; this one is {state.stage}"))
    if isinstance(batches, torch.Tensor):
        raise ConfigTypeError("batches must be an iterable of batches (e.g. a list of tensors), not a single tensor; "
                              "wrap it: [tensor]")
    layers = quantized_units(prepared)
    if not layers:
        raise CalibrationError("this model has no quantized layers to analyse")
    probe = Probe(prepared, layers, batches)
    units = [layer.node for layer in layers]
    rows = []
    bar = tqdm(total=2 * len(layers) + 2, desc="fxquant sensitivity", unit="run", disable=not progress)
    try:
        probe.configure(())
        reference = probe.run()
        bar.update()
        for i, layer in enumerate(layers):
            probe.configure((layer.node,))
            only = _compare(reference, probe.run(), i)
            bar.update()
            probe.configure(units[:i + 1])
            upto = _compare(reference, probe.run(), i)
            bar.update()
            rows.append((layer, only, upto))
        probe.configure(units)
        full_db = _compare(reference, probe.run(), None)[0]
        bar.update()
    finally:
        bar.close()
        probe.restore()
    order = sorted(range(len(rows)), key=lambda i: (rows[i][1][0], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    result = [LayerSensitivity(layer.name, layer.kind, i, rank[i], only[0], upto[0], only[1], upto[1],
                               layer.quantizers) for i, (layer, only, upto) in enumerate(rows)]
    notes = []
    lone = [n.name for n in prepared.graph.nodes if n.op == "call_module" and n.target in probe.quantizers
            and read(n).quantizer is None]
    if lone:
        notes.append(f"{len(lone)} quantizer call(s) carry no provenance and stay on in every run: "
                     + ", ".join(sorted(lone)[:6]))
    return SensitivityReport(state.backend.name, result, full_db, len(probe.batches), notes)
