"""Which ops of a QDQ model meant to run in int8 ONNX Runtime did not fuse, and why.

An op is meant to run in int8 when ORT has an int8 kernel for it and it sits between DequantizeLinear (every
activation input) and QuantizeLinear (every output): ORT's QDQ transformer should replace the group by that
kernel. ORT's optimized graph (``SessionOptions.optimized_model_filepath``, ORT_ENABLE_ALL) says whether it did:
an op still there under its own name in float did not fuse. The reason comes from the group's shape, checked
as ORT's QDQ selectors check it.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import onnx
import onnxruntime as ort

from fxquant.lower.graph import OnnxGraph

INT8_KERNELS = {"Conv": "QLinearConv", "Gemm": "QGemm", "MatMul": "QLinearMatMul", "Add": "QLinearAdd",
                "Mul": "QLinearMul", "Concat": "QLinearConcat", "AveragePool": "QLinearAveragePool",
                "GlobalAveragePool": "QLinearGlobalAveragePool", "Sigmoid": "QLinearSigmoid",
                "Softmax": "QLinearSoftmax"}
BIASED_INT8 = frozenset({"Conv", "Gemm"})  # int8 kernels with a weight and an int32 bias
EIGHT_BIT = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8})


@dataclass(frozen=True)
class Unfused:
    node: str
    op_type: str
    reason: str


@dataclass
class FusionReport:
    """``intended``: ops meant to run in int8; ``unfused``: those ORT left in float, with the reason;
    ``optimized_ops``: op counts of ORT's optimized graph."""

    intended: int
    unfused: list[Unfused] = field(default_factory=list)
    optimized_ops: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"ORT fused {self.intended - len(self.unfused)} of {self.intended} ops meant to run in int8"]
        lines += [f"  unfused {u.node} ({u.op_type}): {u.reason}" for u in self.unfused]
        return "\n".join(lines)


def intended_int8(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes with an ORT int8 kernel whose activation inputs are all dequantized and outputs all quantized
    (directly or through a ReLU/Clip)."""
    g = OnnxGraph(proto)
    producer, consumers, inits = g.producer, g.consumers, g.initializers
    out = []
    for node in proto.graph.node:
        if node.op_type not in INT8_KERNELS:
            continue
        acts = [i for i in node.input if i and i not in inits]
        from_dq = all(getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in acts)
        to_q = all(_quantized(o, consumers) for o in node.output)
        if acts and from_dq and to_q:
            out.append(node)
    return out


def _quantized(name: str, consumers: dict) -> bool:
    """True when every consumer of ``name`` is a QuantizeLinear, looking through a ReLU/Clip ORT folds into it."""
    users = consumers.get(name, [])
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
        return _quantized(users[0].output[0], consumers)
    return bool(users) and all(c.op_type == "QuantizeLinear" for c in users)


def _zero_point_type(dq: onnx.NodeProto, inits: dict) -> int | None:
    """The integer type a DequantizeLinear reads (from its zero point, or its integer initializer input)."""
    for name in (dq.input[2] if len(dq.input) > 2 else "", dq.input[0]):
        if name in inits:
            return inits[name].data_type
    return None


def _reason(node: onnx.NodeProto, producer: dict, inits: dict) -> str:
    """Why ORT's QDQ selector would reject ``node`` (first failing condition)."""
    dq = [producer.get(i) for i in node.input]
    if node.op_type in BIASED_INT8:
        w = dq[1] if len(dq) > 1 else None
        if w is None or w.op_type != "DequantizeLinear" or w.input[0] not in inits:
            return "its weight is not a DequantizeLinear of an integer initializer"
    inputs = dq[:2] if node.op_type in BIASED_INT8 else dq  # the int32 bias is not an 8-bit operand
    types = {_zero_point_type(d, inits) for d in inputs if d is not None and d.op_type == "DequantizeLinear"}
    wide = sorted(onnx.TensorProto.DataType.Name(t) for t in types - {None, *EIGHT_BIT})
    if wide:
        return f"its inputs are quantized to {', '.join(wide)}: ORT's int8 kernels take 8-bit integers only"
    if node.op_type in ("Add", "Mul", "Concat") and len(types - {None}) > 1:
        return "its inputs are quantized to different integer types"
    return ("ORT's QDQ selector did not match this group (check the DequantizeLinear/QuantizeLinear types and zero "
            "points around it in the optimized graph)")


def fusion_report(path: str | os.PathLike) -> FusionReport:
    """Optimize the model at ``path`` in ORT (ORT_ENABLE_ALL, CPU) and report the int8 ops that did not fuse."""
    proto = onnx.load(os.fspath(path))
    intended = intended_int8(proto)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    left = {n.name: n.op_type for n in optimized.graph.node}
    g = OnnxGraph(proto)
    unfused = [Unfused(n.name, n.op_type, _reason(n, g.producer, g.initializers)) for n in intended
               if left.get(n.name) in (n.op_type, f"Fused{n.op_type}")]
    return FusionReport(len(intended), unfused, dict(Counter(n.op_type for n in optimized.graph.node)))
