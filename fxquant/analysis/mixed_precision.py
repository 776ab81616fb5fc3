"""Mixed precision: keep the most sensitive layers in float, as few as reach a target.

1. prepare + calibrate once; rank the quantized layers with ``sensitivity()`` (model-output SQNR with only
   that layer quantized, lowest first).
2. For n = 0, 1, 2, ...: leave the n top-ranked layers float (each quantizer acts only on the edges that a
   still-quantized layer asked for, as excluding those layers would give), convert, and evaluate: model-output
   SQNR against the float model, or a user metric such as validation accuracy. The first n that reaches the
   target wins, so n is the fewest among prefixes of the ranking (not a search over all subsets).
3. Build the result the way a user would: the config plus ``Override(layer, exclude=True)`` for each float
   layer, prepared, calibrated and converted again, and measured again. The exported ONNX leaves those layers
   float; everything else keeps its Q/DQ (and ORT still fuses it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from fxquant.analysis.sensitivity import Probe, SensitivityReport, layer_overrides, quantized_units, sensitivity
from fxquant.api import calibrate, convert, prepare
from fxquant.backends import Backend
from fxquant.errors import ConfigError
from fxquant.metrics import SqnrAccumulator
from fxquant.spec import QuantConfig

Metric = Callable[[nn.Module], float]


@dataclass
class MixedPrecisionResult:
    """What ``mixed_precision`` chose and what it reached.

    ``config`` is the input config plus one ``Override(layer, exclude=True)`` per float layer: pass it to
    ``fxquant.prepare``/``quantize`` to rebuild ``model``. ``value`` is measured on the converted ``model``;
    ``trials`` lists (number of float layers, value) as the search went.
    """

    config: QuantConfig
    float_layers: list[str]
    model: fx.GraphModule
    value: float
    target: float
    measure: str  # "sqnr_db" or "metric"
    trials: list[tuple[int, float]]
    sensitivity: SensitivityReport
    quantized_value: float = math.nan  # the value with every layer quantized
    notes: list[str] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.value >= self.target

    def summary(self) -> str:
        unit = " dB" if self.measure == "sqnr_db" else ""
        lines = [f"mixed precision ({self.sensitivity.backend}): {len(self.float_layers)} of "
                 f"{len(self.sensitivity.layers)} layers kept float; {self.measure} {self.quantized_value:.2f}{unit} "
                 f"all quantized -> {self.value:.2f}{unit} (target {self.target:.2f}{unit}, "
                 f"{'reached' if self.reached else 'NOT reached'})"]
        lines += [f"  float  {name}" for name in self.float_layers]
        lines += [f"  note   {n}" for n in self.notes]
        return "\n".join(lines)


class _SqnrMeter:
    """Model-output SQNR of a model against the float reference (the prepared model, all quantizers off)."""

    def __init__(self, probe: Probe) -> None:
        self.batches = probe.batches
        probe.configure(())
        self.reference = [probe.run_one(batch) for batch in self.batches]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        acc = SqnrAccumulator()
        for batch, ref in zip(self.batches, self.reference, strict=True):
            out = [t for t in tree_leaves(model(*batch)) if isinstance(t, torch.Tensor)]
            for r, t in zip(ref, out, strict=True):
                acc.add(r, t)
        return acc.db


def mixed_precision(model: nn.Module, example_inputs: torch.Tensor | tuple, batches: Iterable,
                    backend: str | Backend = "tensorrt", config: QuantConfig | None = None, *,
                    target_sqnr: float | None = None, metric: Metric | None = None, target: float | None = None,
                    eval_batches: Iterable | None = None, max_float: int | None = None,
                    progress: bool = True) -> MixedPrecisionResult:
    """Targets ``model`` keeping the fewest most-sensitive layers float that reach a target.

    Give either ``target_sqnr`` (dB, model output against the float model on ``eval_batches``, default the
    calibration ``batches``) or ``metric`` (a callable taking a model and returning a score, higher is better,
    e.g. validation accuracy) with ``target``. ``max_float`` caps the number of float layers (default: all).
    """
    if (target_sqnr is None) == (metric is None):
        raise ConfigError("give exactly one of target_sqnr=<dB> or metric=<callable>, target=<score>")
    if metric is not None and (target is None or not callable(metric)):
        raise ConfigError("metric must be a callable model -> score, given with target=<score to reach>")
    goal = float(target_sqnr if metric is None else target)
    if not math.isfinite(goal):
        raise ConfigError(f"the target must be a finite number, got {goal}")
    config = QuantConfig() if config is None else config
    batches = list(batches)
    prepared = prepare(model, example_inputs, backend=backend, config=config)
    calibrate(prepared, batches, progress=progress)
    eval_batches = batches if eval_batches is None else list(eval_batches)
    report = sensitivity(prepared, eval_batches, progress=progress)
    layers = quantized_units(prepared)
    by_name = {layer.name: layer for layer in layers}
    ranking = [by_name[s.name] for s in report.ranked()]
    limit = len(ranking) if max_float is None else max(0, min(int(max_float), len(ranking)))

    probe = Probe(prepared, layers, eval_batches)
    measure = "sqnr_db" if metric is None else "metric"
    trials: list[tuple[int, float]] = []
    chosen = limit
    try:
        meter = _SqnrMeter(probe) if metric is None else None
        score = meter if meter is not None else (lambda m: float(metric(m)))
        for n in tqdm(range(limit + 1), desc="fxquant mixed precision", unit="trial", disable=not progress):
            floats = {layer.name for layer in ranking[:n]}
            # judge the converted model: the arithmetic of the exported ONNX (TensorQuantizer's can differ
            # from it at exact rounding ties, which 4-bit grids hit often)
            value = score(convert(probe.configure((layer.node for layer in layers if layer.name not in floats),
                                                  taps=False)))
            trials.append((n, value))
            if value >= goal:
                chosen = n
                break
    finally:
        probe.restore()

    floats = ranking[:chosen]
    final_config = replace(config, overrides=(*config.overrides, *layer_overrides(floats)))
    qmodel = _build(model, example_inputs, batches, backend, final_config, progress)
    value = score(qmodel)
    result = MixedPrecisionResult(final_config, [layer.name for layer in floats], qmodel, value, goal, measure,
                                  trials, report, quantized_value=trials[0][1])
    if not result.reached:
        why = (f"the search stopped at max_float={limit}" if limit < len(ranking)
               else "even the float model does not reach it")
        result.notes.append(f"target {goal} not reached: {why}")
        warnings.warn(f"mixed precision did not reach the target {goal} ({measure} {value:.3f}): {why}",
                      stacklevel=2)
    elif trials[-1][1] != value:
        result.notes.append(f"the rebuilt model measures {value:.3f}, the search measured {trials[-1][1]:.3f}")
    return result


def _build(model: nn.Module, example_inputs, batches: list, backend, config: QuantConfig,
           progress: bool) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*op\(s\) stay float.*")  # the exclusions we asked for
        prepared = prepare(model, example_inputs, backend=backend, config=config)
    calibrate(prepared, batches, progress=progress)
    return convert(prepared)
