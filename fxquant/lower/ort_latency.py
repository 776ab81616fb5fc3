"""Is the int8 ONNX model faster than float in ONNX Runtime? Its float twin, and an interleaved timing.

The float twin is the QDQ model with every Q/DQ removed: weights and biases dequantized into float
initializers, QuantizeLinear -> DequantizeLinear pairs on activations bypassed. It is the same graph (BatchNorm
already folded) as the fp32 model ORT would run, built without the torch model.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from fxquant.lower.ort_fusion import FusionReport


@dataclass(frozen=True)
class LatencyCheck:
    """Median (and quartiles) in ms of interleaved one-thread runs of the int8 model and its float twin."""

    int8_ms: float
    float_ms: float
    int8_iqr_ms: tuple[float, float]
    float_iqr_ms: tuple[float, float]
    runs: int

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms

    @property
    def slower(self) -> bool:
        return self.int8_ms > self.float_ms


def _dequantized(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    q = inits[node.input[0]].astype(np.float64)
    scale = inits[node.input[1]].astype(np.float64)
    zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if np.ndim(zero) else zero
    return ((q - zero) * scale).astype(np.float32)


def float_twin(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without quantization: constant DequantizeLinears become float initializers and activation
    QuantizeLinear -> DequantizeLinear pairs are bypassed."""
    twin = copy.deepcopy(proto)
    graph = twin.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rename: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            graph.initializer.append(numpy_helper.from_array(_dequantized(node, inits), node.output[0]))
            graph.node.remove(node)
    producer = {o: n for n in graph.node for o in n.output}
    for node in list(graph.node):
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            rename[node.output[0]] = q.input[0]
            graph.node.remove(node)
    def source(name: str) -> str:  # back through chains of bypassed pairs (Q -> DQ -> Q -> DQ)
        while name in rename:
            name = rename[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = source(name)
    for out in graph.output:
        if out.name in rename:  # a graph output keeps its name: an Identity stands where the DQ was
            graph.node.append(onnx.helper.make_node("Identity", [source(out.name)], [out.name]))
    used = {i for n in graph.node for i in n.input}
    for node in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.output[0] not in used]:
        graph.node.remove(node)
    keep = [t for t in graph.initializer if t.name in {i for n in graph.node for i in n.input}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    return twin


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_latency(proto: onnx.ModelProto, feeds: list[np.ndarray], runs: int = 30, warmup: int = 5) -> LatencyCheck:
    """Time ``proto`` against its float twin on ``feeds`` (one thread), alternating the order every round."""
    sessions = [_session(proto), _session(float_twin(proto))]
    named = [{i.name: x for i, x in zip(s.get_inputs(), feeds, strict=False)} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, named, strict=True):
            s.run(None, f)
    times: list[list[float]] = [[], []]
    for r in range(runs):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[k].run(None, named[k])
            times[k].append((time.perf_counter() - start) * 1e3)
    quartiles = [statistics.quantiles(t, n=4) for t in times]
    return LatencyCheck(quartiles[0][1], quartiles[1][1], (quartiles[0][0], quartiles[0][2]),
                        (quartiles[1][0], quartiles[1][2]), runs)


def slower_message(latency: LatencyCheck, fusion: FusionReport) -> str:
    """Where and why the int8 model is slower than its float twin."""
    ops = fusion.optimized_ops
    where = (f"{len(fusion.unfused)} op(s) meant for int8 did not fuse ({', '.join(u.node for u in fusion.unfused)})"
             if fusion.unfused else "every op meant for int8 fused")
    return (f"the int8 model runs slower in ONNX Runtime than its float twin on the example input: median "
            f"{latency.int8_ms:.2f} ms vs {latency.float_ms:.2f} ms ({latency.runs} interleaved one-thread runs). "
            f"Where: {where}; ORT's optimized graph keeps {ops.get('QuantizeLinear', 0)} QuantizeLinear and "
            f"{ops.get('DequantizeLinear', 0)} DequantizeLinear (float <-> int8 conversions around float ops). "
            "Why: at this size the conversions and requantizations cost more than the int8 kernels save (small "
            "layers, batch 1). Ship the float model, keep the slow layers float (QuantConfig overrides with "
            "exclude=True), or pass check_latency=False if the measurement is not representative")
