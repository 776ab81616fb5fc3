"""Which weighted ops to leave in float so an int8 model is never slower than float in ONNX Runtime.

Measured, not guessed: ORT's profiler times every layer (a Conv/Gemm/MatMul with its fused activation) in the int8
model and in its float twin; layers whose int8 kernel is no faster than float go first, then the least profitable
ones in growing steps. Each candidate (and the float twin) runs interleaved, one thread, on the example input,
and the fastest candidate not slower than float wins; running every layer in float is always a candidate, so the
chosen model is never slower than float on the measurement.
"""

from __future__ import annotations

import bisect
import json
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from fxquant.lower.ort.latency import feeds_for, interleaved_ms, session
from fxquant.lower.ort.regions import RegionGraph, standard_form, with_float_layers


@dataclass(frozen=True)
class Candidate:
    """One measured choice: the layers in float and the median latency (ms) of it and of the float twin."""

    floated: tuple[str, ...]
    ms: float
    float_ms: float

    @property
    def speedup(self) -> float:
        return self.float_ms / self.ms


@dataclass
class TunePlan:
    """The chosen layers to run in float (``floated``: node name -> why), the quantizer modules that go with
    them, per-layer profile times in microseconds (int8, float) and every candidate measured."""

    floated: dict[str, str]
    quantizers: set[str]
    layer_us: dict[str, tuple[float, float]]
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    layers: int = 0  # weighted modules (a module called twice counts once)


WARMUP_RUNS = 3  # ORT's first runs pack weights and grow arenas: 20-30x a steady run; never counted


def profile_layers(proto: onnx.ModelProto, inputs: list[np.ndarray], aliases: dict[str, str], runs: int = 20) -> dict:
    """Median kernel time (us) per run of each layer in ORT, over ``runs`` runs after the warm-up ones. An optimized
    node is the layer's when its name, less ORT's ``_token_N`` / ``_nchwc`` suffixes, is one of the layer's
    ``aliases`` (RegionGraph.aliases)."""
    with tempfile.TemporaryDirectory() as tmp:
        profiled = session(proto, profile_dir=tmp)
        feeds = feeds_for(profiled, inputs)
        for _ in range(runs + WARMUP_RUNS):
            profiled.run(None, feeds)
        with open(profiled.end_profiling()) as f:
            events = json.load(f)
    return layer_medians(events, aliases)


def layer_medians(events: list[dict], aliases: dict[str, str], warmup: int = WARMUP_RUNS) -> dict[str, float]:
    """From an ORT profile (chrome-trace events): per layer, the median over the runs after ``warmup`` of its
    kernel time in each run (a layer may run several kernels per run)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name = event["name"].removesuffix("_kernel_time").removesuffix("_nchwc")
        layer = aliases.get(name) or aliases.get(name.rpartition("_token_")[0])
        if layer is not None and starts:
            per_run[layer][bisect.bisect_right(starts, event["ts"]) - 1] += float(event["dur"])
    return {u: statistics.median(times[warmup:] or times) for u, times in per_run.items()}


def _steps(order: list[str], losing: int) -> list[tuple[str, ...]]:
    """Candidate float sets: none, the losing layers, then the least profitable quarter, half, three quarters, all."""
    n = len(order)
    counts = sorted({0, losing, n // 4, n // 2, (3 * n) // 4, n})
    return [tuple(order[:k]) for k in counts]


def plan(proto: onnx.ModelProto, inputs: list[np.ndarray], runs: int = 30) -> TunePlan:
    """Measure and choose the layers of ``proto`` (a static QDQ model) to run in float."""
    regions = RegionGraph(standard_form(proto))
    names = set(regions.layers)
    twin, _ = with_float_layers(proto)
    aliases = regions.aliases()
    int8_us = profile_layers(proto, inputs, aliases)
    float_us = profile_layers(twin, inputs, aliases)
    layer_us = {u: (int8_us.get(u, 0.0), float_us.get(u, 0.0)) for u in names}
    # least profitable first: int8 time minus float time, largest first; ties in graph order
    position = {n.name: i for i, n in enumerate(proto.graph.node)}
    order = sorted(names, key=lambda u: (layer_us[u][1] - layer_us[u][0], position[u]))
    losing = sum(1 for u in order if layer_us[u][0] >= layer_us[u][1])
    steps = _steps(order, losing)
    built = [with_float_layers(proto, set(step)) for step in steps]
    times = [statistics.median(t) for t in interleaved_ms([twin] + [p for p, _ in built], inputs, runs)]
    candidates = [Candidate(step, ms, times[0]) for step, ms in zip(steps, times[1:], strict=True)]
    chosen = choose(candidates)
    quantizers = built[candidates.index(chosen)][1]
    floated = {u: _why(layer_us[u], chosen) for u in chosen.floated}
    modules = len({regions.layers[u].module for u in names})  # a module called twice is two ONNX layers
    return TunePlan(floated, quantizers, layer_us, candidates, chosen, modules)


def choose(candidates: list[Candidate]) -> Candidate:
    """The fastest candidate not slower than the float twin (fewer float layers on a tie); the last candidate,
    every layer float (the float model itself), when each one with an int8 layer was slower."""
    allowed = [c for c in candidates if c.ms <= c.float_ms] or [candidates[-1]]
    return min(allowed, key=lambda c: (c.ms, len(c.floated)))


def _why(us: tuple[float, float], chosen: Candidate) -> str:
    int8, flt = us
    if int8 >= flt:
        return f"int8 is not faster here in ONNX Runtime ({int8:.0f} us int8 vs {flt:.0f} us float, median per run)"
    return (f"int8 saves only {flt - int8:.0f} us here ({int8:.0f} vs {flt:.0f} us), less than the float <-> int8 "
            f"conversions cost around it: the model is fastest with it float ({chosen.ms:.2f} ms vs "
            f"{chosen.float_ms:.2f} ms float)")
