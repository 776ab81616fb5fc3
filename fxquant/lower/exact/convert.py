"""convert(exact=...): arguments checked, the fake-quant model exported, ONNX Runtime's graph of it built as a
torch program (``fxquant.lower.exact.program``), and the exact model given its state.

It sits with export (docs/architecture_intro.md): it exports the model as ``export_onnx`` writes it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import onnx
import onnxruntime as ort
import torch
from torch import nn

from fxquant.backends.base import Backend
from fxquant.capture.trace import normalize_inputs
from fxquant.errors import ConversionError
from fxquant.lower.exact.model import ExactInfo, ExactModel, check_ort_version, ort_optimized, rebuild
from fxquant.lower.exact.program import build_program
from fxquant.lower.onnx_export import export_onnx
from fxquant.lower.outputs import flat_outputs
from fxquant.spec import check_cpu_target
from fxquant.state import attach_state, get_state


def check_exact(exact: object, backend: Backend) -> str:
    """``exact`` if it is a CPU target and the backend deploys to ONNX Runtime's CPU kernels."""
    target = check_cpu_target(exact, "target exact=")
    if backend.runtime != "onnxruntime":
        raise ConversionError(f"convert(exact={exact!r}) reproduces ONNX Runtime's CPU kernels, which the "
                              f"{backend.name} backend does not deploy to: use exact=None (fake quant), or an ONNX "
                              "Runtime backend (onnxruntime, onnxruntime_dynamic)")
    return target


def exact_model(fake: nn.Module, example_inputs: tuple, target: str) -> ExactModel:
    """The exact model of the converted fake-quant model ``fake`` for ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export's own warnings were the user's to see at export time
            export_onnx(fake, example_inputs, path, verify=False)
        proto = onnx.load(path)
        optimized = ort_optimized(path, os.path.join(tmp, "optimized.onnx"))
    program = build_program(optimized, target)
    graph_inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    missing = [n for n in program.input_names if n not in graph_inputs]
    if missing:
        raise ConversionError(f"ONNX Runtime's graph reads inputs the exported model does not have: {missing}")
    positions = [graph_inputs.index(n) for n in program.input_names]
    with torch.no_grad():
        sample = fake(*(x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs))
    count = len(flat_outputs(sample))
    produced = len(next(n for n in program.graph.nodes if n.op == "output").args[0])
    if count != produced:
        raise ConversionError(f"the model returns {count} tensors but ONNX Runtime's graph computes {produced}")
    template = rebuild(sample, [torch.empty(0)] * count)  # the structure, without the example's values
    return ExactModel(program, positions, template, target)


def convert_exact(fake: nn.Module, target: str, example_inputs: torch.Tensor | tuple) -> nn.Module:
    """The exact model of the converted ``fake`` for ``target``, with ``fake``'s state and the exact record."""
    inputs = normalize_inputs(example_inputs)
    if not inputs:
        raise ConversionError("convert(exact=...) exports the model to let ONNX Runtime build its graph and needs "
                              "example inputs: pass example_inputs=")
    message = check_ort_version()
    if message:
        warnings.warn(message, stacklevel=3)
    model = exact_model(fake, inputs, target)
    state = get_state(fake)
    attach_state(model, dataclasses.replace(state, exact=ExactInfo(target, fake, ort.__version__)))
    return model
