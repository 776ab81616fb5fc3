"""Why fxquant writes residual adds before a LayerNorm as Sum (``fxquant.lower.ort.cpu_graph
.plain_residual_layernorm``): ORT fuses ``Add -> LayerNormalization`` into SkipLayerNormalization, whose CPU
kernel was measured slower than its plain Add and LayerNormalization kernels (4-6x on ORT 1.32). This times a
chain of 12 residual LayerNorms at BERT-small widths both ways, one thread, interleaved runs. If an ORT release
makes the fused kernel faster (ratio below 1), drop the pass.

    python benchmarks/skip_layernorm.py        # writes benchmarks/results/skip_layernorm.json
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results_meta import write_results


def residual_layernorms(op: str, length: int, width: int, count: int = 12) -> bytes:
    """``count`` times: x = LayerNorm(op(x, s)), op "Add" (ORT fuses SkipLayerNormalization) or "Sum" (it does not)."""
    g, b = (numpy_helper.from_array(np.ones(width, np.float32) * v, n) for n, v in (("g", 1.0), ("b", 0.0)))
    nodes, cur = [], "x"
    for i in range(count):
        nodes += [helper.make_node(op, [cur, "s"], [f"a{i}"]),
                  helper.make_node("LayerNormalization", [f"a{i}", "g", "b"], [f"n{i}"], axis=-1, epsilon=1e-12)]
        cur = f"n{i}"
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, length, width]) for n in ("x", "s", cur)]
    graph = helper.make_graph(nodes, op, io[:2], io[2:], [g, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def measure(length: int, width: int, runs: int = 200) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {op: ort.InferenceSession(residual_layernorms(op, length, width), options,
                                         providers=["CPUExecutionProvider"]) for op in ("Add", "Sum")}
    fused = [n.op_type for n in onnx.load_from_string(residual_layernorms("Add", length, width)).graph.node]
    feed = {n: np.random.default_rng(0).normal(size=(1, length, width)).astype(np.float32) for n in ("x", "s")}
    times: dict[str, list[float]] = {op: [] for op in sessions}
    for r in range(runs):
        for op in (("Add", "Sum") if r % 2 else ("Sum", "Add")):
            start = time.perf_counter()
            sessions[op].run(None, feed)
            times[op].append(time.perf_counter() - start)
    add_ms, sum_ms = (statistics.median(times[op]) * 1e3 for op in ("Add", "Sum"))
    return {"length": length, "width": width, "skiplayernorm_ms": round(add_ms, 4),
            "add_layernorm_ms": round(sum_ms, 4), "ratio": round(add_ms / sum_ms, 2), "nodes_in": len(fused)}


def main() -> None:
    rows = [measure(length, width) for length, width in ((64, 384), (128, 384), (128, 768))]
    for row in rows:
        print(row)
    print(f"wrote {write_results('skip_layernorm', rows, {'runs': 200, 'threads': 1, 'ort': ort.__version__})}")


if __name__ == "__main__":
    main()
