"""Export pass: float attention, as the SDPA decomposition writes it, becomes ORT's MultiHeadAttention kernel.

When a backend's rules leave both attention matmuls float (``onnxruntime_dynamic``), the exported graph holds,
per layer, ``q, k, v (B, S, N*H) -> Reshape -> Transpose -> MatMul(q, k^T) [-> Where(mask, -inf)] -> Softmax ->
MatMul(., v) -> Transpose -> Reshape``: ten float kernels and their intermediate tensors. ONNX Runtime's
``com.microsoft.MultiHeadAttention`` CPU kernel computes the same ``softmax(q k^T * scale + bias) v`` in one.
The scale is 1 (the decomposition folded ``1/sqrt(H)`` into the query projection; a graph with a scale op of
its own is left as it is) and a boolean mask becomes one additive bias (0 / -inf) shared by every layer.
Anything that does not match exactly (quantized matmuls, other layouts, float masks) stays as exported.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from fxquant.lower.graph import OnnxGraph, attr

_BSNH = [0, 2, 1, 3]  # (B, S, N, H) <-> (B, N, S, H)


def _heads(g: OnnxGraph, name: str, perm: list[int]) -> tuple[str, np.ndarray] | None:
    """(the 3-D input, the 4-D shape) of ``Reshape(x, (B, S, N, H)) -> Transpose(perm)`` producing ``name``."""
    transpose = g.made_by(name, "Transpose", single_use=True)
    reshape = g.made_by(transpose.input[0], "Reshape", single_use=True) if transpose is not None else None
    if reshape is None or list(attr(transpose, "perm") or []) != perm or reshape.input[1] not in g.initializers:
        return None
    shape = g.array(reshape.input[1])
    return (reshape.input[0], shape) if shape.size == 4 and shape[3] > 0 else None


def _is_constant(g: OnnxGraph, name: str, value: float) -> bool:
    array = g.array(name)
    return array is not None and array.size == 1 and float(array.reshape(())) == value


def _merged_output(g: OnnxGraph, matmul: onnx.NodeProto, head: int) -> tuple[list[onnx.NodeProto], int] | None:
    """The nodes ``[Reshape (B, N, S, H)] -> Transpose -> Reshape (B, S, N*H)`` after ``matmul``, and N*H."""
    chain, name = [], matmul.output[0]
    for op_type in ("Reshape", "Transpose", "Reshape"):
        node = g.sole(name, op_type)
        if node is None and op_type == "Reshape" and not chain:
            continue  # the first Reshape is optional
        if node is None:
            return None
        chain.append(node)
        name = node.output[0]
    *_, transpose, merge = chain
    shape = g.array(merge.input[1])
    if list(attr(transpose, "perm") or []) != _BSNH or shape is None or shape.size != 3 or shape[2] % head:
        return None
    return chain, int(shape[2])


def _mask(g: OnnxGraph, scores: onnx.NodeProto) -> tuple[str, str | None, list[onnx.NodeProto]] | None:
    """(the q k^T tensor, the boolean keep-mask or None, the masking nodes) of the scores feeding the Softmax."""
    if scores.op_type == "MatMul":
        return scores.output[0], None, []
    if scores.op_type != "Where":
        return None
    cond, a, b = scores.input
    if _is_constant(g, a, -np.inf) and (negated := g.made_by(cond, "Not")) is not None:
        keep, raw = negated.input[0], b
    elif _is_constant(g, b, -np.inf):
        keep, raw = cond, a
    else:
        return None
    return raw, keep, [scores]


def multi_head_attention(proto: onnx.ModelProto) -> int:
    """Replace every float attention block that matches exactly by MultiHeadAttention; returns how many."""
    g = OnnxGraph(proto)
    shapes, done, biases = g.shapes(), 0, {}
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax" and attr(n, "axis") in (-1, 3)]:
        source = g.producer.get(softmax.input[0])
        masked = _mask(g, source) if source is not None and len(g.users(softmax.input[0])) == 1 else None
        if masked is None:
            continue
        raw, keep, mask_nodes = masked
        qk = g.made_by(raw, "MatMul", single_use=True)
        pv = g.sole(softmax.output[0], "MatMul")
        if qk is None or pv is None or pv.input[0] != softmax.output[0]:
            continue
        q, k, v = _heads(g, qk.input[0], _BSNH), _heads(g, qk.input[1], [0, 2, 3, 1]), _heads(g, pv.input[1], _BSNH)
        if q is None or k is None or v is None or len({int(s[1][3]) for s in (q, k, v)}) != 1:
            continue
        head = int(q[1][3])
        merged = _merged_output(g, pv, head)
        if merged is None:
            continue
        chain, width = merged
        inputs = [q[0], k[0], v[0]]
        if keep is not None:
            shape = _bias_shape(shapes.get(keep), int(q[1][1]), width // head)
            if shape is None:
                continue
            if (keep, shape) not in biases:
                biases[keep, shape] = _bias(g, keep, shape)
            inputs += ["", "", biases[keep, shape]]
        fused = helper.make_node("MultiHeadAttention", inputs, [chain[-1].output[0]], domain="com.microsoft",
                                 num_heads=width // head, scale=1.0, name=f"{softmax.name}/MultiHeadAttention")
        g.insert(pv, [fused])
        g.remove(*mask_nodes, qk, softmax, pv, *chain)
        done += 1
    if done:
        g.use_domain("com.microsoft")
        g.prune()
    return done


def _bias_shape(mask: list | None, queries: int, heads: int) -> tuple[int, ...] | None:
    """What the mask's bias is expanded by to MultiHeadAttention's (B or 1, N or 1, S, T), when the mask is 4-D
    with one or N heads and one or S query rows (batch and key length broadcast as they are)."""
    if mask is None or len(mask) != 4 or queries <= 0 or mask[1] not in (1, heads) or mask[2] not in (1, queries):
        return None
    return (1, 1, queries, 1)


def _bias(g: OnnxGraph, keep: str, shape: tuple[int, ...]) -> str:
    """An additive bias (0 where ``keep``, -inf elsewhere) expanded by ``shape``, computed once after ``keep``."""
    name = f"{keep}_attention_bias_{shape[2]}"
    g.add_initializer(np.array(0.0, np.float32), f"{name}_keep")
    g.add_initializer(np.array(-np.inf, np.float32), f"{name}_drop")
    g.add_initializer(np.array(shape, np.int64), f"{name}_shape")
    at = next((i + 1 for i, n in enumerate(g.graph.node) if keep in n.output), 0)
    g.insert(at, [helper.make_node("Where", [keep, f"{name}_keep", f"{name}_drop"], [f"{name}_where"],
                                   name=f"{name}/Where"),
                  helper.make_node("Expand", [f"{name}_where", f"{name}_shape"], [name], name=f"{name}/Expand")])
    return name
