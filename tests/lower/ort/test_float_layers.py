"""A layer left float between int8 neighbours stays float in ONNX Runtime (fxquant.lower.ort.cpu_graph).

ORT's WeightBiasQuantization quantizes the float weight of a Conv/Gemm that reads a per-tensor DequantizeLinear and
feeds a QuantizeLinear to per-tensor int8 with a scale of its own choosing: an excluded layer would run in int8."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxquant
from fxquant import Override, QuantConfig
from fxquant.lower.onnx_export import ort_session


class Sandwich(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.middle = nn.Conv2d(8, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.last(torch.relu(self.middle(torch.relu(self.first(x)))))
        return self.out(torch.relu(self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))))


def _optimized(path: str, tmp_path) -> onnx.ModelProto:
    ort_session(path, optimized_path=str(tmp_path / "opt.onnx"), level="all")
    return onnx.load(tmp_path / "opt.onnx")


@pytest.mark.smoke
def test_excluded_layers_between_int8_neighbours_stay_float_in_ort(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    config = QuantConfig(overrides=(Override("middle", exclude=True), Override("head", exclude=True)),
                         outlier_channels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(Sandwich().eval(), data[0], data, backend="onnxruntime", config=config,
                                  progress=False)
        result = fxquant.export_onnx(qmodel, data[1], tmp_path / "m.onnx", check_latency=False)
    assert result.ort_sqnr_db >= 35.0
    opt = _optimized(result.path, tmp_path)
    ops = Counter(n.op_type for n in opt.graph.node)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1, ops  # first, last, out: int8
    floats = [n for n in opt.graph.node if n.op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")]
    assert len(floats) == 2, ops  # middle and head: float, with float weights
    inits = {t.name: t for t in opt.graph.initializer}
    for node in floats:
        weight = next(i for i in node.input[1:2])
        if weight in inits:
            assert inits[weight].data_type == onnx.TensorProto.FLOAT
    # without the per-channel DequantizeLinear, ORT quantizes both float layers itself
    undone = onnx.load(result.path)
    graph = undone.graph
    dqs = {n.output[0]: n for n in graph.node if n.name.endswith(".input_dequantize/DequantizeLinear")}
    assert len(dqs) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.input and node.input[0] in dqs:
            dq = dqs[node.input[0]]
            per_tensor = [f"{dq.name}.s", f"{dq.name}.z"]
            graph.initializer.extend([numpy_helper.from_array(inits[dq.input[1]][:1].reshape(()), per_tensor[0]),
                                      numpy_helper.from_array(inits[dq.input[2]][:1].reshape(()), per_tensor[1])])
            dq.input[1:] = per_tensor
            del dq.attribute[:]
    onnx.save(undone, tmp_path / "undone.onnx")
    ops = Counter(n.op_type for n in _optimized(str(tmp_path / "undone.onnx"), tmp_path).graph.node)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 2, ops
    # the per-channel form computes the same values (ORT with no graph optimization at all, bit for bit)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {"input": data[2].numpy()}
    outputs = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]).run(None, feeds)
               for p in (result.path, str(tmp_path / "undone.onnx"))]
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
