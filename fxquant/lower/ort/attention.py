"""Export pass: float attention, as the SDPA decomposition writes it, becomes ORT's MultiHeadAttention kernel.

When a backend's rules leave both attention matmuls float (``onnxruntime_dynamic``), the exported graph holds,
per layer, ``q, k, v (B, S, N*H) -> Reshape -> Transpose -> MatMul(q, k^T) [-> Where(mask, -inf)] -> Softmax ->
MatMul(., v) -> Transpose -> Reshape``: ten float kernels and their intermediate tensors. ONNX Runtime's
``com.microsoft.MultiHeadAttention`` CPU kernel computes the same ``softmax(q k^T * scale + bias) v`` in one.
The scale is 1 (the decomposition folded ``1/sqrt(H)`` into the query projection; a graph with a scale op of
its own is left as it is) and a boolean mask becomes one additive bias (0 / -inf) shared by every layer. Sizes
come from ONNX shape inference, so a graph exported with a dynamic batch and sequence length fuses too.
Anything that does not match exactly (quantized matmuls, other layouts, float masks) stays as exported.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from fxquant.lower.graph import OnnxGraph, attr

Shapes = dict[str, list[int | None]]

_BSNH = [0, 2, 1, 3]  # (B, S, N, H) <-> (B, N, S, H)


def _heads(g: OnnxGraph, name: str, perm: list[int], shapes: Shapes) -> tuple[str, int, int] | None:
    """(the 3-D input, heads N, head size H) of ``Reshape(x, (B, S, N, H)) -> Transpose(perm)`` producing ``name``,
    from the inferred shapes (batch and length may be symbolic: a graph exported with dynamic axes)."""
    transpose = g.made_by(name, "Transpose", single_use=True)
    reshape = g.made_by(transpose.input[0], "Reshape", single_use=True) if transpose is not None else None
    if reshape is None or list(attr(transpose, "perm") or []) != perm:
        return None
    split, flat = shapes.get(reshape.output[0]), shapes.get(reshape.input[0])
    if split is None or flat is None or len(split) != 4 or len(flat) != 3:
        return None
    heads, head = split[2], split[3]
    if not heads or not head or heads <= 0 or head <= 0 or flat[2] not in (None, heads * head):
        return None
    return reshape.input[0], heads, head


def _is_constant(g: OnnxGraph, name: str, value: float) -> bool:
    array = g.array(name)
    return array is not None and array.size == 1 and float(array.reshape(())) == value


def _merged_output(g: OnnxGraph, matmul: onnx.NodeProto, width: int, shapes: Shapes) -> list[onnx.NodeProto] | None:
    """The nodes ``[Reshape (B, N, S, H)] -> Transpose -> Reshape (B, S, N*H)`` after ``matmul``, when N*H is
    ``width``."""
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
    merged = shapes.get(merge.output[0])
    if list(attr(transpose, "perm") or []) != _BSNH or merged is None or len(merged) != 3 or merged[2] != width:
        return None
    return chain


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
        q, k, v = (_heads(g, qk.input[0], _BSNH, shapes), _heads(g, qk.input[1], [0, 2, 3, 1], shapes),
                   _heads(g, pv.input[1], _BSNH, shapes))
        if q is None or k is None or v is None or len({s[1:] for s in (q, k, v)}) != 1:
            continue
        _, heads, head = q
        chain = _merged_output(g, pv, heads * head, shapes)
        if chain is None:
            continue
        inputs = [q[0], k[0], v[0]]
        if keep is not None:
            mask, queries = shapes.get(keep), shapes[q[0]][1]
            if mask is None or len(mask) != 4 or mask[1] not in (1, heads) or mask[2] not in (None, 1, queries):
                continue
            if keep not in biases:
                biases[keep] = _bias(g, keep)
            has_rows = queries is not None and mask[2] == queries
            inputs += ["", "", biases[keep] if has_rows else _rows(g, biases[keep], q[0])]
        fused = helper.make_node("MultiHeadAttention", inputs, [chain[-1].output[0]], domain="com.microsoft",
                                 num_heads=heads, scale=1.0, name=f"{softmax.name}/MultiHeadAttention")
        g.insert(pv, [fused])
        g.remove(*mask_nodes, qk, softmax, pv, *chain)
        done += 1
    if done:
        g.use_domain("com.microsoft")
        g.prune()
    return done


def _bias(g: OnnxGraph, keep: str) -> str:
    """An additive bias (0 where ``keep``, -inf elsewhere), computed once after ``keep``."""
    name = f"{keep}_attention_bias"
    g.add_initializer(np.array(0.0, np.float32), f"{name}_keep")
    g.add_initializer(np.array(-np.inf, np.float32), f"{name}_drop")
    at = next((i + 1 for i, n in enumerate(g.graph.node) if keep in n.output), 0)
    g.insert(at, [helper.make_node("Where", [keep, f"{name}_keep", f"{name}_drop"], [name], name=f"{name}/Where")])
    return name


def _rows(g: OnnxGraph, bias: str, queries: str) -> str:
    """``bias`` with one row per query (MultiHeadAttention's (B or 1, N or 1, S, T)): expanded by (1, 1, S, 1),
    S read from the 3-D ``queries`` (it may be symbolic), after both are computed."""
    name = f"{bias}_rows_of_{queries}"
    ones, one = g.add_initializer(np.array([1, 1], np.int64), f"{name}_11"), g.add_initializer(np.array([1], np.int64),
                                                                                               f"{name}_1")
    at = max(i for i, n in enumerate(g.graph.node) if queries in n.output or bias in n.output) + 1
    g.insert(at, [helper.make_node("Shape", [queries], [f"{name}_s"], name=f"{name}/Shape", start=1, end=2),
                  helper.make_node("Concat", [ones, f"{name}_s", one], [f"{name}_shape"], name=f"{name}/Concat",
                                   axis=0),
                  helper.make_node("Expand", [bias, f"{name}_shape"], [name], name=f"{name}/Expand")])
    return name
