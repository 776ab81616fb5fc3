"""Export passes that write a model's float ops in the forms ONNX Runtime's CPU kernels run fastest.

The values are unchanged (bit for bit); only what ORT's graph optimizer makes of them changes:

- ``fusable_gelu``: the exporter writes erf-GELU as ``x * (0.5 * (1 + erf(x / sqrt 2)))``, an order ORT's
  GeluFusion does not match, so five elementwise kernels run; written ``(x * (1 + erf(x / sqrt 2))) * 0.5``
  (exact: scaling by 0.5 is exact in binary floating point) ORT fuses it into one Gelu kernel.
- ``plain_residual_layernorm``: ORT fuses ``Add -> LayerNormalization`` into SkipLayerNormalization, whose CPU
  kernel (ORT 1.32, x86) runs 4-6x slower than its own Add plus LayerNormalization kernels (measured: 62 vs
  14 us per call at 24 x 384, 323 vs 51 us at 128 x 384, one thread; 12-14 % of all-MiniLM-L6-v2's int8 run
  time). The residual add is written as the equivalent ``Sum``, which that fusion does not match.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _is(constants: dict, name: str, value: float) -> bool:
    array = constants.get(name)
    return array is not None and array.size == 1 and math.isclose(float(array.reshape(())), value, rel_tol=1e-6)


def sole(users: dict, name: str, op_type: str) -> onnx.NodeProto | None:
    found = users.get(name, [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (None when ``name`` is not one of them)."""
    inputs = list(node.input)
    return inputs[1 - inputs.index(name)] if len(inputs) == 2 and name in inputs else None


def fusable_gelu(proto: onnx.ModelProto) -> int:
    """Reorder every ``Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(0.5) -> Mul(x)`` into
    ``... -> Add(1) -> Mul(x) -> Mul(0.5)``, the order ORT fuses into Gelu; returns how many."""
    graph = proto.graph
    constants, users = _constants(graph), consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    done = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _is(constants, div.input[1], math.sqrt(2)):
            continue
        x = div.input[0]
        add = sole(users, erf.output[0], "Add")
        half = sole(users, add.output[0], "Mul") if add is not None else None
        if half is None or not _is(constants, _other(add, erf.output[0]), 1.0):
            continue
        half_const = _other(half, add.output[0])
        outer = sole(users, half.output[0], "Mul")
        if outer is None or not _is(constants, half_const, 0.5) or _other(outer, half.output[0]) != x:
            continue
        half.input[:] = [x, add.output[0]]  # x * (1 + erf)
        outer.input[:] = [half.output[0], half_const]  # ... * 0.5
        done += 1
    return done


def plain_residual_layernorm(proto: onnx.ModelProto) -> int:
    """Write every Add that feeds a LayerNormalization as Sum (same values); returns how many."""
    graph = proto.graph
    users = consumers(graph)
    done = 0
    for node in graph.node:
        if node.op_type == "Add" and any(u.op_type == "LayerNormalization" for u in users.get(node.output[0], [])):
            node.op_type = "Sum"
            done += 1
    return done


def for_ort_cpu(proto: onnx.ModelProto) -> dict[str, int]:
    """Run both passes; how many sites each rewrote."""
    return {"gelu": fusable_gelu(proto), "residual_layernorm": plain_residual_layernorm(proto)}
