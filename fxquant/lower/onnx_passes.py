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
from onnx import helper

from fxquant import qmath
from fxquant.lower.graph import OnnxGraph, attr


def fold_weight_quantization(proto: onnx.ModelProto) -> int:
    """Replace ``initializer -> QuantizeLinear`` by an integer initializer; returns how many were folded."""
    g = OnnxGraph(proto)
    uses = Counter({name: len(users) for name, users in g.consumers.items()})
    folded = 0
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in g.initializers or len(node.input) < 3:
            continue
        w, scale, zp = (g.array(n) for n in node.input[:3])
        if scale is None or zp is None:
            continue
        axis = attr(node, "axis", 1) % w.ndim if scale.ndim else 0
        info = np.iinfo(zp.dtype)
        per_axis = axis if scale.ndim else None
        step = qmath.along_axis(torch.tensor(scale), w.ndim, per_axis)
        zero_point = qmath.along_axis(torch.tensor(zp, dtype=torch.float32), w.ndim, per_axis)
        q = qmath.quantize(torch.tensor(w), step, zero_point, info.min, info.max).numpy().astype(zp.dtype)
        g.replace_input(node.output[0], g.add_initializer(q, f"{node.input[0]}_quantized"))
        g.remove(node)
        uses[node.input[0]] -= 1
        if uses[node.input[0]] == 0:
            g.remove_initializer(node.input[0])
        folded += 1
    return folded


def quantize_biases(proto: onnx.ModelProto) -> int:
    """Give Conv/Gemm whose input and weight are dequantized an int32 bias (scale = s_x * s_w, zero point 0)."""
    g = OnnxGraph(proto)
    done = 0
    for node in list(g.graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in g.initializers:
            continue
        dq_x, dq_w = g.producer.get(node.input[0]), g.producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in node.attribute):
            continue
        s_x, s_w = g.array(dq_x.input[1]), g.array(dq_w.input[1])
        if s_x is None or s_w is None or s_x.ndim != 0:
            continue
        bias = g.array(node.input[2]).astype(np.float64)
        scale = (s_x.astype(np.float64) * s_w.astype(np.float64)).astype(np.float32)
        if np.any(np.abs(bias / np.maximum(scale, np.finfo(np.float32).tiny)) > 2**31 - 1):
            _bias_after(g, node, bias.astype(np.float32), g.array(dq_w.input[0]).ndim)
            continue  # int32 codes would saturate (16-bit scales, tiny weights): the bias stays float
        q = qmath.quantize(torch.tensor(bias), torch.tensor(scale, dtype=torch.float64), 0.0, -(2**31), 2**31 - 1)
        q = q.numpy().astype(np.int32)
        bias_name = node.input[2]
        base = _unused_stem(g, bias_name)  # a shared Conv's bias: one int32 copy per call (its input scale)
        g.add_initializer(q, f"{base}_quantized")
        g.add_initializer(scale, f"{base}_quantizer.scale")
        g.add_initializer(np.zeros_like(q) if scale.ndim else np.array(0, np.int32), f"{base}_quantizer.zero_point")
        dq = helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_quantizer.scale",
                                                  f"{base}_quantizer.zero_point"],
                              [f"{base}_dequantized"], name=f"{base}_quantizer/DequantizeLinear", axis=0)
        g.insert(node, [dq])
        node.input[2] = f"{base}_dequantized"
        g.changed()
        if not g.users(bias_name):
            g.remove_initializer(bias_name)
        done += 1
    return done


def _bias_after(g: OnnxGraph, node: onnx.NodeProto, bias: np.ndarray, rank: int) -> None:
    """Move the float bias of ``node`` (Conv/Gemm) into an Add after it: ORT's WeightBiasQuantization would
    otherwise quantize it to int32 itself, saturating the same way."""
    shape = (-1,) + (1,) * (rank - 2) if node.op_type == "Conv" else (-1,)
    name = g.add_initializer(bias.reshape(shape), f"{node.input[2]}_after")
    out, old = node.output[0], node.input[2]
    node.output[0] = f"{out}_without_bias"
    del node.input[2]
    g.changed()
    g.drop_unused([old])
    add = helper.make_node("Add", [node.output[0], name], [out], name=f"{node.name}_bias")
    g.insert(list(g.graph.node).index(node) + 1, [add])


def _unused_stem(g: OnnxGraph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... : the first whose ``_quantized`` initializer does not exist yet."""
    taken = g.initializers
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
    g = OnnxGraph(proto)
    ranks = {name: len(shape) for name, shape in g.shapes().items()}
    rewritten = 0
    for node in g.graph.node:
        rank = ranks.get(node.input[0]) if node.op_type == "ReduceMean" else None
        if rank is None or rank < 3 or len(node.input) < 2 or node.input[1] not in g.initializers:
            continue
        axes = {int(a) % rank for a in np.atleast_1d(g.array(node.input[1]))}
        if attr(node, "keepdims", 1) != 1 or axes != set(range(2, rank)):
            continue
        axes_input = node.input[1]
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        g.changed()
        if not g.users(axes_input):
            g.remove_initializer(axes_input)
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


def merge_pads(proto: onnx.ModelProto) -> int:
    """Merge a constant zero ``Pad`` of spatial dimensions into the ``Conv`` nodes it feeds, as their ``pads``
    (which take begin and end amounts apart: the asymmetric TF "same" padding a torch conv cannot express).
    The Pad may feed the Convs directly or through one QuantizeLinear -> DequantizeLinear (the convs' input
    quantizer): quantizing a padded 0 gives the zero point, which dequantizes to 0, so Conv padding the
    dequantized tensor with zeros computes the same values (and ORT's QLinearConv pads with the zero point).
    Returns how many Pads were merged."""
    g = OnnxGraph(proto)
    merged = 0
    for pad in [n for n in g.graph.node if n.op_type == "Pad"]:
        amounts = _zero_spatial_pad(pad, g)
        path = _conv_path(pad.output[0], g) if amounts is not None else None
        if not path:
            continue
        for conv in (n for n in path if n.op_type == "Conv"):
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * len(amounts))
            others = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend([*others, helper.make_attribute(
                "pads", [o + a for o, a in zip(old, amounts, strict=True)])])
        users = list(g.users(pad.output[0]))  # each reads the Pad once, as its data input (_conv_path)
        g.replace_input(pad.output[0], pad.input[0])
        unpadded = {pad.output[0]} | {n.output[0] for n in path if n.op_type != "Conv"}  # their shapes changed
        for info in [v for v in g.graph.value_info if v.name in unpadded]:
            g.graph.value_info.remove(info)
        g.remove(pad)
        g.drop_unused(pad.input[1:])
        for user in users:
            _drop_requantize(g, user)
        merged += 1
    return merged


def _drop_requantize(g: OnnxGraph, q: onnx.NodeProto) -> None:
    """With the Pad gone, ``DequantizeLinear -> QuantizeLinear`` with the same scale and zero point (a float Pad's
    requantization) gives back the codes it reads: the QuantizeLinear's readers take those codes directly."""
    dq = g.producer.get(q.input[0])
    if q.op_type != "QuantizeLinear" or dq is None or dq.op_type != "DequantizeLinear" or \
            len(q.input) < 3 or len(dq.input) < 3 or \
            any(not _same(g, a, b) for a, b in zip(q.input[1:3], dq.input[1:3], strict=True)) or \
            {a.name: a.i for a in q.attribute if a.name == "axis"} != {a.name: a.i for a in dq.attribute
                                                                       if a.name == "axis"}:
        return
    g.replace_input(q.output[0], dq.input[0])
    g.remove(q)
    if not g.users(dq.output[0]) and dq.output[0] not in g.outputs():
        g.remove(dq)


def _same(g: OnnxGraph, a: str, b: str) -> bool:
    """Whether two Q/DQ parameter inputs hold the same tensor (the same name, or equal initializers)."""
    if a == b:
        return True
    x, y = g.array(a), g.array(b)
    return x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y)


def _zero_spatial_pad(pad: onnx.NodeProto, g: OnnxGraph) -> list[int] | None:
    """The spatial pad amounts (Conv ``pads`` order: every begin, then every end) of a constant-mode Pad that
    pads only dimensions 2.. by non-negative amounts with 0; None for any other Pad."""
    mode = attr(pad, "mode", b"constant")
    if mode != b"constant" or len(pad.input) < 2 or (len(pad.input) > 3 and pad.input[3]):
        return None  # another mode, or an ``axes`` input
    amounts = g.constant(pad.input[1])
    value = g.constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
    if amounts is None or value is None or value.size != 1 or value.item() != 0 or amounts.size < 6:
        return None
    rank = amounts.size // 2
    begin, end = amounts[:rank].tolist(), amounts[rank:].tolist()
    if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(amounts) < 0:
        return None
    return begin[2:] + end[2:]


def _conv_path(name: str, g: OnnxGraph,
               chain: tuple[str, ...] = ("QuantizeLinear", "DequantizeLinear")) -> list[onnx.NodeProto] | None:
    """The nodes from ``name`` to the Convs (``auto_pad`` NOTSET) reading it as their data input, directly or
    through one QuantizeLinear -> DequantizeLinear (``chain``: the steps still allowed); None when anything
    else reads it or a graph output is on the way."""
    users = g.users(name)
    if name in g.outputs() or not users:
        return None
    path: list[onnx.NodeProto] = []
    for user in users:
        if user.input[0] != name or name in user.input[1:]:
            return None
        if user.op_type == "Conv" and len(chain) != 1 and \
                all(a.name != "auto_pad" or a.s == b"NOTSET" for a in user.attribute):
            path.append(user)  # before the QuantizeLinear, or after the DequantizeLinear
        elif chain and user.op_type == chain[0]:
            inner = _conv_path(user.output[0], g, chain[1:])
            if inner is None:
                return None
            path += [user, *inner]
        else:
            return None
    return path
