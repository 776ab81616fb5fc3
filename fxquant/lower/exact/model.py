"""``fxquant.convert(prepared, exact=target)``: the converted model as ONNX Runtime computes it on ``target``.

``fxquant.lower.exact.convert`` exports the fake-quant model to QDQ ONNX as ``export_onnx`` writes it, ONNX Runtime
optimizes that graph (``ort_optimized``: every QDQ fusion), and ``build_program`` turns ORT's graph into a torch
program of exact kernels. ``ExactModel`` runs it with the fake-quant model's calling convention and
output structure; its state records the target and the fake-quant twin, which ``export_onnx`` exports (the same QDQ
ONNX) and checks against.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
import onnxruntime as ort
import torch
from torch import nn

from fxquant.lower.exact.program import Program

VERIFIED_ORT = "1.32.0"
"""The ONNX Runtime version whose kernels the exact program was verified against, bit for bit."""


@dataclass
class ExactInfo:
    """What an exact model carries: its CPU target and the fake-quant model it was made from (export writes
    that one's QDQ ONNX)."""

    target: str
    fake: nn.Module
    ort_version: str


def check_ort_version() -> str | None:
    """A warning message when the installed ONNX Runtime is not the version the kernels were verified against."""
    if ort.__version__ == VERIFIED_ORT:
        return None
    return (f"exact conversion reproduces ONNX Runtime {VERIFIED_ORT}'s CPU kernels, but onnxruntime "
            f"{ort.__version__} is installed: its kernels may round differently. export_onnx's check counts the "
            "differing outputs and names the first differing tensor; install onnxruntime=="
            f"{VERIFIED_ORT} for a verified emulation")


def rebuild(template: object, tensors: list[torch.Tensor]) -> object:
    """``template`` (the fake-quant model's output) with its tensors replaced by ``tensors``, in
    ``flat_outputs`` order."""
    return _rebuild(template, tensors, [0])


def _rebuild(template: object, tensors: list[torch.Tensor], index: list[int]) -> object:
    if isinstance(template, torch.Tensor):
        index[0] += 1
        return tensors[index[0] - 1]
    if template is None:
        return None
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        out = copy.copy(template)
        for f in dataclasses.fields(template):
            setattr(out, f.name, _rebuild(getattr(template, f.name), tensors, index))
        return out
    if isinstance(template, Mapping):
        return type(template)((k, _rebuild(v, tensors, index)) for k, v in template.items())
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(_rebuild(v, tensors, index) for v in template))
    if isinstance(template, (tuple, list)):
        return type(template)(_rebuild(v, tensors, index) for v in template)
    return template


class ExactModel(nn.Module):
    """A converted model that computes what ONNX Runtime's CPU kernels compute on its target, bit for bit where
    ORT runs integer kernels. Call it as the fake-quant model; ``program`` is ORT's graph as a GraphModule."""

    def __init__(self, program: Program, positions: list[int], template: object, target: str) -> None:
        super().__init__()
        self.program = program
        self.positions = positions  # which tensor argument feeds each program input
        self.template = template
        self.target = target

    def forward(self, *args: object) -> object:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        with torch.no_grad():
            outputs = self.program(*(tensors[p] for p in self.positions))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return rebuild(self.template, list(outputs))

    def extra_repr(self) -> str:
        return f"target={self.target!r}, {len(self.program.graph.nodes)} program nodes"


def ort_optimized(path: str, optimized: str) -> onnx.ModelProto:
    """ONNX Runtime's graph of the model at ``path`` after every QDQ fusion (ORT_ENABLE_EXTENDED)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = optimized
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return onnx.load(optimized)
