"""ONNX-level passes export_onnx runs on the exported QDQ model: weights become integer initializers, biases of
quantized Conv/Gemm int32 (for backends that need them), spatial ReduceMean becomes GlobalAveragePool, nodes are
named after their modules, and shapes are inferred strictly. Each pass edits the ModelProto in place.
"""

from __future__ import annotations

import ast
from collections import Counter

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from fxquant import qmath


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _array(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def fold_weight_quantization(proto: onnx.ModelProto) -> int:
    """Replace ``initializer -> QuantizeLinear`` by an integer initializer; returns how many were folded."""
    graph = proto.graph
    inits = _initializers(proto)
    consumers = Counter(i for n in graph.node for i in n.input)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits or len(node.input) < 3:
            continue
        w, scale, zp = (_array(inits, n) for n in node.input[:3])
        if scale is None or zp is None:
            continue
        axis = _axis(node) % w.ndim if scale.ndim else 0
        info = np.iinfo(zp.dtype)
        per_axis = axis if scale.ndim else None
        step = qmath.along_axis(torch.tensor(scale), w.ndim, per_axis)
        zero_point = qmath.along_axis(torch.tensor(zp, dtype=torch.float32), w.ndim, per_axis)
        q = qmath.quantize(torch.tensor(w), step, zero_point, info.min, info.max).numpy().astype(zp.dtype)
        name = f"{node.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(q, name))
        for other in graph.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = name
        graph.node.remove(node)
        consumers[node.input[0]] -= 1
        if consumers[node.input[0]] == 0:
            graph.initializer.remove(inits[node.input[0]])
        folded += 1
    return folded


def quantize_biases(proto: onnx.ModelProto) -> int:
    """Give Conv/Gemm whose input and weight are dequantized an int32 bias (scale = s_x * s_w, zero point 0)."""
    graph = proto.graph
    inits = _initializers(proto)
    producer = {o: n for n in graph.node for o in n.output}
    done = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in node.attribute):
            continue
        s_x, s_w = _array(inits, dq_x.input[1]), _array(inits, dq_w.input[1])
        if s_x is None or s_w is None or s_x.ndim != 0:
            continue
        bias = _array(inits, node.input[2]).astype(np.float64)
        scale = (s_x.astype(np.float64) * s_w.astype(np.float64)).astype(np.float32)
        q = qmath.quantize(torch.tensor(bias), torch.tensor(scale, dtype=torch.float64), 0.0, -(2**31), 2**31 - 1)
        q = q.numpy().astype(np.int32)
        bias_name = node.input[2]
        base = _unused_stem(graph, bias_name)  # a shared Conv's bias: one int32 copy per call (its input scale)
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}_quantized"),
                                  numpy_helper.from_array(scale, f"{base}_quantizer.scale"),
                                  numpy_helper.from_array(np.zeros_like(q) if scale.ndim else np.array(0, np.int32),
                                                          f"{base}_quantizer.zero_point")])
        dq = helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_quantizer.scale",
                                                  f"{base}_quantizer.zero_point"],
                              [f"{base}_dequantized"], name=f"{base}_quantizer/DequantizeLinear", axis=0)
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = f"{base}_dequantized"
        base = bias_name
        if sum(1 for n in graph.node for i in n.input if i == base) == 0:
            graph.initializer.remove(inits[base])
        done += 1
    return done


def _unused_stem(graph: onnx.GraphProto, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... : the first whose ``_quantized`` initializer does not exist yet."""
    taken = {t.name for t in graph.initializer}
    stem, k = name, 0
    while f"{stem}_quantized" in taken:
        k += 1
        stem = f"{name}_{k}"
    return stem


def global_average_pools(proto: onnx.ModelProto) -> int:
    """Rewrite ``ReduceMean`` over every spatial axis with ``keepdims=1`` (how the dynamo exporter writes
    adaptive average pooling to 1x1 and ``x.mean((2, 3), keepdim=True)``) as ``GlobalAveragePool``, the same
    values, which ONNX Runtime fuses with its Q/DQ into QLinearGlobalAveragePool (it has no int8 ReduceMean) and
    TensorRT runs as a pooling layer. Returns how many were rewritten."""
    graph = proto.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(proto).graph.value_info if v.type.tensor_type.HasField("shape")}
    ranks.update((v.name, len(v.type.tensor_type.shape.dim)) for v in graph.input)
    inits = _initializers(proto)
    rewritten = 0
    for node in graph.node:
        rank = ranks.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if rank is None or rank < 3 or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = {int(a) % rank for a in np.atleast_1d(_array(inits, node.input[1]))}
        if attrs.get("keepdims", 1) != 1 or axes != set(range(2, rank)):
            continue
        axes_input = node.input[1]
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        if not any(axes_input in n.input for n in graph.node):
            graph.initializer.remove(inits[axes_input])
        rewritten += 1
    return rewritten


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX shape inference applied (value_info for every intermediate tensor, including
    those the passes above added), checked strictly: an inconsistent graph fails here, not in a runtime."""
    try:  # data propagation also types the outputs of shape arithmetic (Reshape targets with a dynamic batch)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def name_nodes(proto: onnx.ModelProto) -> None:
    """Name each node ``<module path>/<OpType>`` (unique-ified): Q/DQ after the quantizer whose scale they
    read, other nodes from the exporter's scope metadata."""
    used: Counter = Counter()
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1].endswith(".scale"):
            prefix = node.input[1].removesuffix(".scale")
        else:
            scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
            try:
                parts = ast.literal_eval(scopes) if scopes else []
            except (ValueError, SyntaxError):
                parts = []
            # the innermost module scope; a root-level function gets the exporter's name for it (e.g. view)
            prefix = next((p for p in reversed(parts[:-1]) if p), parts[-1] if parts else "") \
                or node.name.removeprefix("node_")
        base = f"{prefix}/{node.op_type}"
        used[base] += 1
        node.name = base if used[base] == 1 else f"{base}_{used[base] - 1}"
