"""Export's check of an exact model: ONNX Runtime's outputs against the exact model's, element by element, and
where they differ, the first ONNX tensor (in graph order) whose values differ.

Locating runs ORT once more with intermediate tensors exposed as graph outputs. Exposing a tensor can change what
ORT fuses (a QDQ group whose inner tensor is a graph output is not fused), so only tensors that survive fusion
are exposed: those that ORT's optimized graph of the unmodified model still computes (the outputs of its fused
integer kernels, i.e. the quantized codes, and of the float ops between them). The optimized graph of the tapped
model is compared with the untapped one, op by op; if exposing changed it, only the quantized codes are exposed,
and if that changes it too, the location is not reported (``ExactCheck.note`` says so).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper
from torch import fx

from fxquant.lower.exact.model import ExactModel, ort_optimized
from fxquant.lower.graph import OnnxGraph
from fxquant.lower.ort.targets import run_as
from fxquant.lower.outputs import flat_outputs
from fxquant.metrics import sqnr


@dataclass
class Mismatch:
    """The first ONNX tensor whose values ORT and the exact model compute differently."""

    tensor: str
    node: str  # the QDQ graph's node that computes it
    op_type: str
    ort_op: str  # the op ONNX Runtime's optimized graph computes it with (a fused integer kernel, or the same op)
    ort_node: str  # that node's name in ORT's graph (a fused kernel is named after the layer: `conv2/Conv`)
    differing: int
    total: int

    def __str__(self) -> str:
        return (f"`{self.tensor}`, output of `{self.node}` ({self.op_type}; ONNX Runtime computes it with "
                f"{self.ort_op} `{self.ort_node}`): {self.differing} of {self.total} values differ")


@dataclass
class ExactCheck:
    """ORT (as the exact model's CPU target) against the exact model on the export's example inputs."""

    differing: int  # output elements whose values differ
    total: int  # output elements compared
    sqnr_db: float  # worst output SQNR of ORT against the exact model (inf when identical)
    first_mismatch: Mismatch | None = None
    note: str | None = None  # why no mismatch could be located, when one should have been


def _differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return np.ones(max(a.size, b.size), bool)
    same = a == b
    if a.dtype.kind == "f":
        same |= np.isnan(a) & np.isnan(b)
    return ~same


def check_exact(model: ExactModel, inputs: tuple, path: str, target: str) -> ExactCheck:
    """Run the ONNX file ``path`` in ORT as ``target`` and compare with ``model`` on ``inputs``."""
    feeds = [x.detach().cpu().numpy() for x in inputs if isinstance(x, torch.Tensor)]
    with torch.no_grad():
        expected = [t.numpy() for _, t in flat_outputs(model(*(x.clone() if isinstance(x, torch.Tensor) else x
                                                                for x in inputs)))]
    got = run_as(target, path, feeds, "all")
    differing = sum(int(_differ(e, g).sum()) for e, g in zip(expected, got, strict=True))
    total = sum(int(np.asarray(e).size) for e in expected)
    worst = min(sqnr(torch.from_numpy(np.asarray(e, np.float64)), torch.from_numpy(np.asarray(g, np.float64)))
                for e, g in zip(expected, got, strict=True))
    check = ExactCheck(differing, total, worst)
    if differing:
        check.first_mismatch, check.note = locate(model, path, feeds, target)
    return check


def _optimized_ops(path: str) -> tuple[Counter, dict[str, onnx.NodeProto]]:
    """The op counts of ORT's optimized graph of ``path``, and the node computing each of its tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        proto = ort_optimized(path, os.path.join(tmp, "optimized.onnx"))
    return Counter((n.domain, n.op_type) for n in proto.graph.node), OnnxGraph(proto).producer


def _with_outputs(proto: onnx.ModelProto, names: list[str], path: str) -> None:
    tapped = onnx.ModelProto()
    tapped.CopyFrom(proto)
    types = {v.name: v for v in tapped.graph.value_info}
    for name in names:
        info = types.get(name)
        tapped.graph.output.append(info if info is not None else helper.make_empty_tensor_value_info(name))
    onnx.save(tapped, path)


def _program_values(model: ExactModel, feeds: list[np.ndarray], wanted: set[str]) -> dict[str, torch.Tensor]:
    """The values the exact program computes for the ONNX tensors in ``wanted``."""
    program = model.program
    names = program.tensor_names
    found: dict[str, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if names.get(n.name) in wanted and isinstance(out, torch.Tensor):
                found[names[n.name]] = out
            return out

    tensors = [torch.from_numpy(f) for f in feeds]
    with torch.no_grad():
        Capture(program).run(*(tensors[p] for p in model.positions))
    return found


def locate(model: ExactModel, path: str, feeds: list[np.ndarray], target: str) -> tuple[Mismatch | None,
                                                                                        str | None]:
    """The first tensor of the ONNX model at ``path`` (graph order) whose values ORT and ``model`` compute
    differently; (None, why) when it cannot be told."""
    proto = onnx.load(path)
    ops, survivors = _optimized_ops(path)
    outputs = [o.name for o in proto.graph.output]
    known = set(model.program.tensor_names.values())
    producers = OnnxGraph(proto).producer
    candidates = [o for n in proto.graph.node for o in n.output
                  if o in survivors and o in known and o not in outputs]
    codes = [c for c in candidates if _is_code(proto, c)]
    with tempfile.TemporaryDirectory() as tmp:
        tapped = os.path.join(tmp, "tapped.onnx")
        for taps in (candidates, codes):
            _with_outputs(proto, taps, tapped)
            if _optimized_ops(tapped)[0] == ops:
                break
        else:
            return None, ("exposing intermediate tensors changed the graph ONNX Runtime optimizes, so their values "
                          "would not be the deployed ones: no location")
        values = run_as(target, tapped, feeds, "all")
    ort_values = dict(zip(outputs + taps, values, strict=True))
    mine = _program_values(model, feeds, set(taps) | set(outputs))
    compared = set(taps) | set(outputs)
    for name in [o for n in proto.graph.node for o in n.output if o in compared]:  # graph order
        if name not in mine:
            continue
        bad = _differ(mine[name].numpy(), ort_values[name])
        if bad.any():
            node = producers.get(name)
            fused = survivors.get(name)
            return Mismatch(name, node.name if node else name, node.op_type if node else "graph input",
                            fused.op_type if fused else "?", fused.name if fused else "?", int(bad.sum()),
                            int(bad.size)), None
    return None, "no exposed tensor differs, yet the outputs do"


def _is_code(proto: onnx.ModelProto, name: str) -> bool:
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    return types.get(name) in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


def exact_differs_message(check: ExactCheck, target: str) -> str:
    where = (f"The first differing tensor: {check.first_mismatch}" if check.first_mismatch else
             f"No location: {check.note}")
    return (f"ONNX Runtime (as a {target!r} CPU) computes {check.differing} of {check.total} output values "
            f"differently from the exact model ({check.sqnr_db:.1f} dB). {where}. docs/deploy-exact.md lists what is "
            "exact and what is not")
