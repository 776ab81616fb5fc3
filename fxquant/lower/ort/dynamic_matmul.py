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
from onnx import TensorProto, helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def linear_weight(node: onnx.NodeProto, producer: dict, inits: dict) -> tuple[onnx.NodeProto, bool] | None:
    """The weight's DequantizeLinear and whether it is already (K, N) (else (N, K), transposed by the op)."""
    if node.op_type == "Gemm":
        a = _attrs(node)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        dq, transposed = producer.get(node.input[1]), bool(a.get("transB", 0))
    else:
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or list(_attrs(t).get("perm", [1, 0])) != [1, 0]:
            return None
        dq, transposed = producer.get(t.input[0]), True
    if dq is None or dq.op_type != "DequantizeLinear" or any(i not in inits for i in dq.input[:3]):
        return None
    if numpy_helper.to_array(inits[dq.input[0]]).ndim != 2:
        return None
    return dq, transposed


def _dynamic_input(node: onnx.NodeProto, producer: dict) -> onnx.NodeProto | None:
    dq = producer.get(node.input[0])
    dql = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or list(dq.input[:3]) != list(dql.output):
        return None
    return dql


def dynamic_matmuls(proto: onnx.ModelProto) -> int:
    """Rewrite every Linear with a dynamic uint8 input and an int8 weight into MatMulInteger; returns how many."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    done = 0
    for node in list(graph.node):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        dql, found = _dynamic_input(node, producer), linear_weight(node, producer, inits)
        if dql is None or found is None:
            continue
        dq, transposed = found
        w = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zero_point = numpy_helper.to_array(inits[dq.input[2]])
        if scale.ndim and (_attrs(dq).get("axis", 1) % 2 != (0 if transposed else 1)):
            continue  # per-channel along the reduced axis: not a per-column scale
        base = dq.input[0]
        w_kn = np.ascontiguousarray(w.T if transposed else w)
        names = {k: f"{base}_{k}" for k in ("kn", "zp", "scale", "int32", "float", "rescale", "product")}
        graph.initializer.extend([numpy_helper.from_array(w_kn, names["kn"]),
                                  numpy_helper.from_array(np.broadcast_to(zero_point, scale.shape).copy(),
                                                          names["zp"]),
                                  numpy_helper.from_array(scale, names["scale"])])
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
        splice(graph, node, new)
        done += 1
    prune(proto)
    return done


def splice(graph: onnx.GraphProto, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Replace ``node`` by the nodes ``new``, in its place in the graph's order."""
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, n in enumerate(new):
        graph.node.insert(at + offset, n)


def prune(proto: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is used (Q/DQ and Transposes the rewrite left) and unused initializers."""
    graph = proto.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def merge_shared_input(proto: onnx.ModelProto) -> int:
    """Merge the rewritten Linears that read one DynamicQuantizeLinear (attention's q, k and v projections) into
    one MatMulInteger over their concatenated weights, bias Add and a Split: one wider integer GEMM (ORT's
    DynamicQuantizeMatMul) instead of several narrow ones, the same values. Returns how many groups merged."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    merged = 0
    for dql in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        chains = [c for c in (_chain(m, consumers, inits) for m in consumers.get(dql.output[0], [])) if c]
        if len(chains) < 2 or len(chains) != len(consumers.get(dql.output[0], [])):
            continue
        arrays = [[numpy_helper.to_array(inits[n]) for n in c[-1]] for c in chains]  # weight, zp, scale, bias
        if len({a[0].shape[0] for a in arrays}) != 1:
            continue
        base = f"{chains[0][0].input[1]}_merged"
        weight, zp, scale, bias = (np.concatenate([a[k] for a in arrays], axis=-1) for k in range(4))
        graph.initializer.extend(numpy_helper.from_array(v, f"{base}_{k}") for k, v in
                                 (("kn", weight), ("zp", zp), ("scale", scale), ("bias", bias),
                                  ("split", np.array([a[0].shape[1] for a in arrays], np.int64))))
        names = [f"{base}_{k}" for k in ("int32", "float", "product", "unbiased")]
        new = [helper.make_node("MatMulInteger", [dql.output[0], f"{base}_kn", dql.output[2], f"{base}_zp"],
                                [names[0]]),
               helper.make_node("Cast", [names[0]], [names[1]], to=TensorProto.FLOAT),
               helper.make_node("Mul", [dql.output[1], f"{base}_scale"], [names[2]]),
               helper.make_node("Mul", [names[1], names[2]], [names[3]]),
               helper.make_node("Add", [names[3], f"{base}_bias"], [f"{base}_biased"]),
               helper.make_node("Split", [f"{base}_biased", f"{base}_split"], [c[4].output[0] for c in chains],
                                axis=-1)]
        at = min(list(graph.node).index(c[0]) for c in chains)
        for c in chains:
            for n in c[:5]:
                graph.node.remove(n)
        for offset, n in enumerate(new):
            graph.node.insert(at + offset, n)
        merged += 1
    prune(proto)
    return merged


def _only(consumers: dict, name: str, op_type: str) -> onnx.NodeProto | None:
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _chain(matmul: onnx.NodeProto, consumers: dict, inits: dict) -> tuple | None:
    """(MatMulInteger, Cast, scale Mul, rescale Mul, bias Add, initializer names) of one rewritten Linear."""
    if matmul.op_type != "MatMulInteger" or matmul.input[1] not in inits or matmul.input[3] not in inits:
        return None
    cast = _only(consumers, matmul.output[0], "Cast")
    rescale = _only(consumers, cast.output[0], "Mul") if cast else None
    add = _only(consumers, rescale.output[0], "Add") if rescale else None
    if add is None or add.input[1] not in inits:
        return None
    producer = [n for ns in consumers.values() for n in ns if rescale.input[1] in n.output]
    scale_mul = producer[0] if producer and producer[0].op_type == "Mul" else None
    if scale_mul is None or scale_mul.input[1] not in inits or len(consumers.get(scale_mul.output[0], [])) != 1:
        return None
    if numpy_helper.to_array(inits[add.input[1]]).ndim != 1 or numpy_helper.to_array(
            inits[scale_mul.input[1]]).ndim != 1:  # per-channel weight scales and a bias: concatenable
        return None
    return matmul, cast, scale_mul, rescale, add, (matmul.input[1], matmul.input[3], scale_mul.input[1], add.input[1])
