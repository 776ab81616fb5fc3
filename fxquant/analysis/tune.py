"""tune(): leave float the layers where int8 is slower in ONNX Runtime, so the model is never slower than float."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fxquant.backends.base import Backend
from fxquant.capture.trace import normalize_inputs
from fxquant.errors import ConfigError, ConversionError
from fxquant.lower.frozen import FrozenDynamicQuantizer, FrozenQuantizer
from fxquant.lower.onnx_export import export_onnx
from fxquant.lower.ort.tune import Candidate, plan
from fxquant.report import OpEntry
from fxquant.state import get_state


@dataclass
class TuneResult:
    """``model``: a copy of the converted model with ``floated`` (layer -> why) run in float; ``speedup``: its
    ORT latency gain over the float model on the example input, as measured; ``candidates``: every choice timed."""

    model: nn.Module
    floated: dict[str, str]
    units: int
    speedup: float
    candidates: list[Candidate]

    def summary(self) -> str:
        head = f"tune: {self.units - len(self.floated)} of {self.units} weighted layers stay int8; "
        if len(self.floated) == self.units:
            head += ("every candidate with an int8 layer was slower than float in ONNX Runtime (one thread, example "
                     f"input), so the tuned model is the float model (measured {self.speedup:.2f}x its float twin: "
                     "the same graph, timing noise): ship the float model")
        else:
            head += (f"the tuned model runs {self.speedup:.2f}x the float model's speed in ONNX Runtime (one thread, "
                     "example input)")
        return "\n".join([head] + [f"  float: {layer}: {why}" for layer, why in self.floated.items()])


def check_tunable(backend: Backend, dynamic: bool = False) -> None:
    """Raise ConfigError unless models of ``backend`` (with static activations) can be tuned."""
    if backend.runtime != "onnxruntime":
        raise ConfigError(f"tune measures ONNX Runtime's fused int8 kernels; the {backend.name!r} backend's graph "
                          "targets another runtime: tune models quantized with backend='onnxruntime'")
    if dynamic or backend.activation.dynamic:
        raise ConfigError("tune works on static int8 models; dynamic activations (QuantSpec(dynamic=True)) are "
                          "quantized per call in ORT and need no tuning: leave a layer float with QuantConfig "
                          "overrides instead")


def tune(model: nn.Module, example_inputs: torch.Tensor | tuple, runs: int = 30) -> TuneResult:
    """Measure a converted ``onnxruntime``-preset model in ORT and leave float the layers (Conv/Gemm/MatMul with
    their activation quantizers) where int8 does not pay, so it is never slower than float on ``example_inputs``
    (use the deployment batch size). Returns a copy; ``model`` is not changed. Export the copy with export_onnx."""
    state = get_state(model)
    if state is None or state.stage != "converted":
        raise ConversionError("tune() takes the model returned by fxquant.convert() or fxquant.quantize()")
    check_tunable(state.backend, dynamic=any(isinstance(m, FrozenDynamicQuantizer) for m in model.modules()))
    if not isinstance(runs, int) or runs < 5:
        raise ConfigError(f"runs must be an int >= 5 (timed runs per candidate), got {runs!r}")
    inputs = normalize_inputs(example_inputs)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export's own warnings reach the user when they export the result
        proto = export_onnx(model, inputs, os.path.join(tmp, "int8.onnx"), verify=False, check_latency=False).model
    chosen = plan(proto, [x.detach().cpu().numpy() for x in inputs if isinstance(x, torch.Tensor)], runs)
    tuned = copy.deepcopy(model)
    float_layers(tuned, chosen.floated, chosen.quantizers)
    get_state(tuned).report.notes.append(f"tune kept {chosen.layers - len(chosen.floated)} of {chosen.layers} "
                                         f"weighted layers int8 ({chosen.chosen.speedup:.2f}x float in ORT)")
    return TuneResult(tuned, {_layer(u): why for u, why in chosen.floated.items()}, chosen.layers,
                      chosen.chosen.speedup, chosen.candidates)


def _layer(node: str) -> str:
    return node.rpartition("/")[0] or node


def float_layers(model: nn.Module, floated: dict[str, str], quantizers: set[str]) -> None:
    """In ``model`` (converted), replace ``quantizers`` (the second result of
    ``fxquant.lower.ort.regions.with_float_layers``) by Identity and report the ONNX nodes ``floated`` (node -> why) as
    float."""
    for name in sorted(quantizers):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConversionError(f"tune: the ONNX quantizer `{name}` has no module in the model") from None
        if not isinstance(module, FrozenQuantizer):
            raise ConversionError(f"tune: `{name}` is a {type(module).__name__}, not a converted quantizer")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity().eval())
    report = get_state(model).report
    correction = report.ptq.get("bias_correction")
    with torch.no_grad():  # a float layer needs no compensation of its weights' rounding: its own bias back
        for layer, shift in (correction.data.get("bias_shifts", {}) if correction else {}).items():
            if f"{layer}.weight_quantizer" in quantizers:
                bias = model.get_submodule(layer).bias
                bias.add_(torch.tensor(shift, dtype=bias.dtype, device=bias.device))
    for node, why in floated.items():
        report.float_ops.append(OpEntry(_layer(node), node.rpartition("/")[2], f"tune: {why}"))
