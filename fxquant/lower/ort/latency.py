"""Is the int8 ONNX model faster than float in ONNX Runtime? Its float twin, and an interleaved timing.

The float twin is the QDQ model with every Q/DQ removed: weights and biases dequantized into float
initializers, QuantizeLinear -> DequantizeLinear pairs on activations bypassed. It is the same graph (BatchNorm
already folded) as the fp32 model ORT would run, built without the torch model.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from fxquant.lower.ort.fusion import FusionReport
from fxquant.lower.ort.regions import with_float_layers


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


def float_twin(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without quantization: constant DequantizeLinears become float initializers and activation
    QuantizeLinear -> DequantizeLinear pairs are bypassed."""
    return with_float_layers(proto)[0]


def session(model: onnx.ModelProto, profile_dir: str | None = None) -> ort.InferenceSession:
    """A one-thread CPU session with every graph optimization, as deployed (profiling into ``profile_dir``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds_for(s: ort.InferenceSession, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: x for i, x in zip(s.get_inputs(), inputs, strict=False)}


def interleaved_ms(protos: list[onnx.ModelProto], inputs: list[np.ndarray], runs: int = 30,
                   warmup: int = 5) -> list[list[float]]:
    """Wall times (ms) of ``runs`` one-thread runs of each model, rotating the order every round so machine
    noise hits all alike."""
    return interleaved_session_ms([session(p) for p in protos], inputs, runs, warmup)


def interleaved_session_ms(sessions: list[ort.InferenceSession], inputs: list[np.ndarray], runs: int = 30,
                           warmup: int = 5) -> list[list[float]]:
    """``interleaved_ms`` for sessions already built (any options)."""
    feeds = [feeds_for(s, inputs) for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds, strict=True):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(runs):
        for k in [(r + i) % len(sessions) for i in range(len(sessions))]:
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append((time.perf_counter() - start) * 1e3)
    return times


def check_latency(proto: onnx.ModelProto, feeds: list[np.ndarray], runs: int = 30, warmup: int = 5) -> LatencyCheck:
    """Time ``proto`` against its float twin on ``feeds`` (one thread), alternating the order every round."""
    times = interleaved_ms([proto, float_twin(proto)], feeds, runs, warmup)
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
            "layers, batch 1). Run fxquant.tune() on the converted model (it leaves float the layers where int8 is "
            "slower), keep slow layers float (QuantConfig overrides with "
            "exclude=True), or pass check_latency=False if the measurement is not representative")
