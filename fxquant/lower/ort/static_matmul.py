"""Export pass: a Linear with a static uint8 input and a float output becomes ORT's MatMulIntegerToFloat.

A Linear whose output only reaches float ops (the FFN and attention-output projections of a transformer, which
feed GELU or the residual add before a LayerNorm) exports as ``QuantizeLinear -> DequantizeLinear -> MatMul
(DequantizeLinear int8 weight) -> Add(bias)``. ORT's optimizer turns MatMul + Add into a float Gemm before its
QDQ fusion runs, so the weight would be dequantized at run time and the layer run in float, slower than fp32.
It fuses the integer op itself only when it is written out: ``MatMulIntegerToFloat(x_q, w_q, x_scale, w_scale,
x_zero_point, w_zero_point, bias)`` (com.microsoft; the standard-op form MatMulInteger -> Cast -> Mul does not
fuse with a constant input scale, which ORT folds first). Same arithmetic as the fake-quant model: integer
products of the uint8 input and int8 weight codes, rescaled per output column, plus the float bias.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from fxquant.lower.graph import EIGHT_BIT, OnnxGraph

MS_DOMAIN = "com.microsoft"


def _static_input(node: onnx.NodeProto, g: OnnxGraph) -> onnx.NodeProto | None:
    """The per-tensor uint8/int8 QuantizeLinear (constant scale and zero point) behind the node's input DQ."""
    dq = g.producer.get(node.input[0])
    q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or list(q.input[1:3]) != list(dq.input[1:3]):
        return None
    if any(i not in g.initializers for i in q.input[1:3]) or g.array(q.input[1]).ndim != 0:
        return None
    return q if g.initializers[q.input[2]].data_type in EIGHT_BIT else None  # ORT's op takes 8-bit codes only


def _float_output(node: onnx.NodeProto, g: OnnxGraph) -> tuple[str | None, str]:
    """(the bias initializer folded in or None, the output the fused op takes over); ("", "") when the output is
    requantized (ORT fuses QLinearMatMul/QGemm there: nothing to do)."""
    users = g.users(node.output[0])
    if any(u.op_type == "QuantizeLinear" for u in users):
        return "", ""
    if node.op_type == "Gemm":
        return (node.input[2] if len(node.input) > 2 and node.input[2] else None), node.output[0]
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        if any(u.op_type == "QuantizeLinear" for u in g.users(add.output[0])):
            return "", ""  # MatMul + bias Add -> Q: ORT fuses it into QGemm
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = g.array(other)
        if bias is not None and bias.ndim == 1 and bias.dtype == np.float32:
            return other, add.output[0]
    return None, node.output[0]


def integer_to_float_matmuls(proto: onnx.ModelProto) -> int:
    """Rewrite each Linear with a static quantized input, an int8 weight and a float output into
    MatMulIntegerToFloat; returns how many."""
    g = OnnxGraph(proto)
    done = 0
    for node, dq, transposed in g.column_weighted_linears():
        q = _static_input(node, g)
        if q is None:
            continue
        bias, out = _float_output(node, g)
        if not out:
            continue
        w = g.array(dq.input[0])
        kn = g.add_initializer(np.ascontiguousarray(w.T if transposed else w), f"{dq.input[0]}_kn")
        # the weight quantizer's own scale and zero point (per output column): the node still names its quantizer
        fused = helper.make_node("MatMulIntegerToFloat", [q.output[0], kn, q.input[1], dq.input[1], q.input[2],
                                                          dq.input[2]] + ([bias] if bias else []),
                                 [out], name=f"{node.name.rpartition('/')[0] or node.name}/MatMulIntegerToFloat",
                                 domain=MS_DOMAIN)
        bias_add = g.users(node.output[0])[0] if out != node.output[0] else None  # inside the fused op now
        g.splice(node, [fused])
        if bias_add is not None:
            g.remove(bias_add)
        done += 1
    if done:
        g.use_domain(MS_DOMAIN)
        g.prune()
    return done


def unfuse_integer_matmuls(proto: onnx.ModelProto) -> int:
    """The inverse rewrite, in place: each MatMulIntegerToFloat back to ``DequantizeLinear -> MatMul(Transpose(
    DequantizeLinear weight)) [-> Add bias]``, the QDQ form the other passes read (same node name)."""
    g = OnnxGraph(proto)
    done = 0
    for node in [n for n in g.graph.node if n.op_type == "MatMulIntegerToFloat" and n.domain == MS_DOMAIN]:
        x_q, w_kn, x_scale, w_scale, x_zero, w_zero = node.input[:6]
        bias = node.input[6] if len(node.input) > 6 and node.input[6] else None
        if w_kn not in g.initializers:
            continue
        w_nk = g.add_initializer(np.ascontiguousarray(g.array(w_kn).T), f"{w_kn}_nk")
        module = node.name.rpartition("/")[0] or node.name
        out = node.output[0]
        names = [f"{out}_{k}" for k in ("x", "w", "wt", "mm")]
        new = [helper.make_node("DequantizeLinear", [x_q, x_scale, x_zero], [names[0]],
                                name=f"{module}/input/DequantizeLinear"),
               helper.make_node("DequantizeLinear", [w_nk, w_scale, w_zero], [names[1]], axis=0,
                                name=f"{module}.weight_quantizer/DequantizeLinear"),
               helper.make_node("Transpose", [names[1]], [names[2]], perm=[1, 0], name=f"{module}/Transpose"),
               helper.make_node("MatMul", [names[0], names[2]], [names[3] if bias else out], name=node.name)]
        if bias:
            new.append(helper.make_node("Add", [names[3], bias], [out], name=f"{module}/Add"))
        g.splice(node, new)
        done += 1
    g.prune()
    return done
