"""Export pass: a Linear with a dynamic uint8 input becomes the integer pattern ORT fuses.

``DynamicQuantizeLinear -> DequantizeLinear -> MatMul/Gemm`` with a ``DequantizeLinear`` (int8 weight
initializer, optionally through a Transpose) on the other input is rewritten as ORT's ``quantize_dynamic``
writes it: ``MatMulInteger(x_q, w_q^T, x_zero_point, w_zero_point) -> Cast(float) -> Mul(x_scale * w_scale)``
(then the bias Add). ORT fuses that into MatMulIntegerToFloat and, with the DynamicQuantizeLinear, into
DynamicQuantizeMatMul: the Linear runs in an integer kernel instead of dequantizing its weight at run time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from fxquant.lower.graph import OnnxGraph


def _dynamic_input(node: onnx.NodeProto, g: OnnxGraph) -> onnx.NodeProto | None:
    dq = g.producer.get(node.input[0])
    dql = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or list(dq.input[:3]) != list(dql.output):
        return None
    return dql


def dynamic_matmuls(proto: onnx.ModelProto) -> int:
    """Rewrite every Linear with a dynamic uint8 input and an int8 weight into MatMulInteger; returns how many."""
    g = OnnxGraph(proto)
    done = 0
    for node, dq, transposed in g.column_weighted_linears():
        dql = _dynamic_input(node, g)
        if dql is None:
            continue
        w = g.array(dq.input[0])
        scale = g.array(dq.input[1]).astype(np.float32)
        zero_point = g.array(dq.input[2])
        base = dq.input[0]
        w_kn = np.ascontiguousarray(w.T if transposed else w)
        names = {k: f"{base}_{k}" for k in ("kn", "zp", "scale", "int32", "float", "rescale", "product")}
        g.add_initializer(w_kn, names["kn"])
        g.add_initializer(np.broadcast_to(zero_point, scale.shape).copy(), names["zp"])
        g.add_initializer(scale, names["scale"])
        out = node.output[0] if node.op_type == "MatMul" or len(node.input) < 3 else f"{base}_unbiased"
        new = [helper.make_node("MatMulInteger", [dql.output[0], names["kn"], dql.output[2], names["zp"]],
                                [names["int32"]], name=f"{node.name}/MatMulInteger"),
               helper.make_node("Cast", [names["int32"]], [names["float"]], to=TensorProto.FLOAT,
                                name=f"{node.name}/Cast"),
               helper.make_node("Mul", [dql.output[1], names["scale"]], [names["product"]],
                                name=f"{node.name}/ScaleMul"),
               helper.make_node("Mul", [names["float"], names["product"]], [out], name=f"{node.name}/Rescale")]
        if out != node.output[0]:
            new.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}/Bias"))
        g.splice(node, new)
        done += 1
    g.prune()
    return done


def merge_shared_input(proto: onnx.ModelProto) -> int:
    """Merge the rewritten Linears that read one DynamicQuantizeLinear (attention's q, k and v projections) into
    one MatMulInteger over their concatenated weights, bias Add and a Split: one wider integer GEMM (ORT's
    DynamicQuantizeMatMul) instead of several narrow ones, the same values. Returns how many groups merged."""
    g = OnnxGraph(proto)
    merged = 0
    for dql in [n for n in g.graph.node if n.op_type == "DynamicQuantizeLinear"]:
        chains = [c for c in (_chain(m, g) for m in g.users(dql.output[0])) if c]
        if len(chains) < 2 or len(chains) != len(g.users(dql.output[0])):
            continue
        arrays = [[g.array(n) for n in c[-1]] for c in chains]  # weight, zp, scale, bias
        if len({a[0].shape[0] for a in arrays}) != 1:
            continue
        base = f"{chains[0][0].input[1]}_merged"
        weight, zp, scale, bias = (np.concatenate([a[k] for a in arrays], axis=-1) for k in range(4))
        for k, v in (("kn", weight), ("zp", zp), ("scale", scale), ("bias", bias),
                     ("split", np.array([a[0].shape[1] for a in arrays], np.int64))):
            g.add_initializer(v, f"{base}_{k}")
        names = [f"{base}_{k}" for k in ("int32", "float", "product", "unbiased")]
        new = [helper.make_node("MatMulInteger", [dql.output[0], f"{base}_kn", dql.output[2], f"{base}_zp"],
                                [names[0]]),
               helper.make_node("Cast", [names[0]], [names[1]], to=TensorProto.FLOAT),
               helper.make_node("Mul", [dql.output[1], f"{base}_scale"], [names[2]]),
               helper.make_node("Mul", [names[1], names[2]], [names[3]]),
               helper.make_node("Add", [names[3], f"{base}_bias"], [f"{base}_biased"]),
               helper.make_node("Split", [f"{base}_biased", f"{base}_split"], [c[4].output[0] for c in chains],
                                axis=-1)]
        at = min(list(g.graph.node).index(c[0]) for c in chains)
        g.remove(*(n for c in chains for n in c[:5]))
        g.insert(at, new)
        merged += 1
    g.prune()
    return merged


def _chain(matmul: onnx.NodeProto, g: OnnxGraph) -> tuple | None:
    """(MatMulInteger, Cast, scale Mul, rescale Mul, bias Add, initializer names) of one rewritten Linear."""
    inits = g.initializers
    if matmul.op_type != "MatMulInteger" or matmul.input[1] not in inits or matmul.input[3] not in inits:
        return None
    cast = g.sole(matmul.output[0], "Cast")
    rescale = g.sole(cast.output[0], "Mul") if cast else None
    add = g.sole(rescale.output[0], "Add") if rescale else None
    if add is None or add.input[1] not in inits:
        return None
    scale_mul = g.made_by(rescale.input[1], "Mul")
    if scale_mul is None or scale_mul.input[1] not in inits or len(g.users(scale_mul.output[0])) != 1:
        return None
    if g.array(add.input[1]).ndim != 1 or g.array(scale_mul.input[1]).ndim != 1:
        return None  # per-channel weight scales and a bias: concatenable
    return matmul, cast, scale_mul, rescale, add, (matmul.input[1], matmul.input[3], scale_mul.input[1], add.input[1])
