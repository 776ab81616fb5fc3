"""Export passes that write a model's float ops in the forms ONNX Runtime's CPU kernels run fastest.

The values are unchanged (bit for bit); only what ORT's graph optimizer makes of them changes:

- ``fusable_gelu``: the exporter writes erf-GELU as ``x * (0.5 * (1 + erf(x / sqrt 2)))``, an order ORT's
  GeluFusion does not match, so five elementwise kernels run; written ``(x * (1 + erf(x / sqrt 2))) * 0.5``
  (exact: scaling by 0.5 is exact in binary floating point) ORT fuses it into one Gelu kernel.
- ``plain_residual_layernorm``: ORT fuses ``Add -> LayerNormalization`` into SkipLayerNormalization, whose CPU
  kernel (ORT 1.32, x86) runs 4-6x slower than its own Add plus LayerNormalization kernels (measured: 62 vs
  14 us per call at 24 x 384, 323 vs 51 us at 128 x 384, one thread; 12-14 % of all-MiniLM-L6-v2's int8 run
  time; ``benchmarks/skip_layernorm.py`` re-measures it). The residual add is written as the equivalent ``Sum``,
  which that fusion does not match.
- ``float_layers_stay_float``: ORT's WeightBiasQuantization (graph level 1) quantizes the float weight of a
  Conv/ConvTranspose/Gemm to per-tensor int8 with its own scale when the op reads a per-tensor
  DequantizeLinear and feeds a QuantizeLinear: a layer left float (an exclusion, mixed precision, ``tune``) between
  int8 neighbours would silently run in int8. Such an op reads its input through its own DequantizeLinear with the
  scale and zero point repeated along the channel axis (the same values), which that transform does not match.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from fxquant.lower.graph import OnnxGraph, attrs


def _is(g: OnnxGraph, name: str | None, value: float) -> bool:
    array = g.constant(name) if name is not None else None
    return array is not None and array.size == 1 and math.isclose(float(array.reshape(())), value, rel_tol=1e-6)


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (None when ``name`` is not one of them)."""
    inputs = list(node.input)
    return inputs[1 - inputs.index(name)] if len(inputs) == 2 and name in inputs else None


def fusable_gelu(proto: onnx.ModelProto) -> int:
    """Reorder every ``Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(0.5) -> Mul(x)`` into
    ``... -> Add(1) -> Mul(x) -> Mul(0.5)``, the order ORT fuses into Gelu; returns how many."""
    g = OnnxGraph(proto)
    done = 0
    for erf in [n for n in g.graph.node if n.op_type == "Erf"]:
        div = g.made_by(erf.input[0], "Div")
        if div is None or not _is(g, div.input[1], math.sqrt(2)):
            continue
        x = div.input[0]
        add = g.sole(erf.output[0], "Add")
        half = g.sole(add.output[0], "Mul") if add is not None else None
        if half is None or not _is(g, _other(add, erf.output[0]), 1.0):
            continue
        half_const = _other(half, add.output[0])
        outer = g.sole(half.output[0], "Mul")
        if outer is None or not _is(g, half_const, 0.5) or _other(outer, half.output[0]) != x:
            continue
        half.input[:] = [x, add.output[0]]  # x * (1 + erf)
        outer.input[:] = [half.output[0], half_const]  # ... * 0.5
        done += 1
    return done


def plain_residual_layernorm(proto: onnx.ModelProto) -> int:
    """Write every Add that feeds a LayerNormalization as Sum (same values); returns how many."""
    g = OnnxGraph(proto)
    done = 0
    for node in g.graph.node:
        if node.op_type == "Add" and any(u.op_type == "LayerNormalization" for u in g.users(node.output[0])):
            node.op_type = "Sum"
            done += 1
    return done


def _input_channels(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int]:
    """(channel axis of input 0, its size) for a Conv/ConvTranspose/Gemm with ``weight``."""
    a = attrs(node)
    if node.op_type == "Conv":
        return 1, weight.shape[1] * a.get("group", 1)
    if node.op_type == "ConvTranspose":
        return 1, weight.shape[0]
    return (0 if a.get("transA", 0) else 1), weight.shape[1 if a.get("transB", 0) else 0]


def float_layers_stay_float(proto: onnx.ModelProto) -> int:
    """Give every Conv/ConvTranspose/Gemm with a float weight initializer that reads a per-tensor
    DequantizeLinear its own per-channel DequantizeLinear of the same values; returns how many."""
    g = OnnxGraph(proto)
    floats = {t.name for t in g.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    users = dict(g.consumers)  # as the graph was: a DequantizeLinear's other readers before any rewrite
    done = 0
    for node in [n for n in g.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")]:
        dq = g.made_by(node.input[0], "DequantizeLinear")
        if len(node.input) < 2 or node.input[1] not in floats or dq is None:
            continue
        scale = g.constant(dq.input[1])
        zero = g.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or scale.size != 1 or (len(dq.input) > 2 and dq.input[2] and zero is None):
            continue
        axis, channels = _input_channels(node, g.array(node.input[1]))
        name = f"{node.name or node.output[0]}.input_dequantize"
        inputs = [dq.input[0], g.add_initializer(np.full(channels, scale.reshape(()), scale.dtype), f"{name}.scale")]
        if zero is not None:
            inputs.append(g.add_initializer(np.full(channels, zero.reshape(()), zero.dtype), f"{name}.zero_point"))
        per_channel = onnx.helper.make_node("DequantizeLinear", inputs, [f"{name}.output"], name=name, axis=axis)
        g.insert(node, [per_channel])
        if len(users[node.input[0]]) == 1 and node.input[0] not in g.outputs():
            g.remove(dq)  # the per-tensor DequantizeLinear fed only this op
        node.input[0] = per_channel.output[0]
        g.changed()
        done += 1
    return done


def for_ort_cpu(proto: onnx.ModelProto) -> dict[str, int]:
    """Run the passes; how many sites each rewrote."""
    return {"gelu": fusable_gelu(proto), "residual_layernorm": plain_residual_layernorm(proto),
            "float_layers": float_layers_stay_float(proto)}
