"""The TensorRT fusion lint (fxquant.lower.trt_lint): what TensorRT would run in higher precision."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxquant
from fxquant.lower.trt_lint import trt_fusion_lint


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _export(tmp_path, config=None):
    torch.manual_seed(0)
    data = [torch.randn(2, 8, 8, 8) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = fxquant.quantize(Block().eval(), data[0], data, backend="tensorrt", config=config, progress=False)
        result = fxquant.export_onnx(qmodel, data[0], tmp_path / "block.onnx")
    return result, [str(w.message) for w in caught]


def test_tensorrt_preset_places_qdq_where_tensorrt_fuses_everything(tmp_path):
    result, messages = _export(tmp_path)
    assert result.trt_lint == []
    assert not any("higher precision" in m for m in messages)


def test_an_excluded_conv_is_reported_in_higher_precision(tmp_path):
    config = fxquant.QuantConfig(overrides=[fxquant.Override("conv2", exclude=True)])
    result, messages = _export(tmp_path, config)
    findings = {(f.node, f.op_type) for f in result.trt_lint}
    assert findings == {("conv2/Conv", "Conv")}
    assert "carry no Q/DQ" in result.trt_lint[0].reason
    assert any("1 place(s) TensorRT would run in higher precision" in m for m in messages)


def test_stranded_qdq_and_unfusable_residual_add():
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("Sigmoid", ["xd"], ["sig"], name="sigmoid"),
             helper.make_node("Add", ["xd", "sig"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], inits)
    findings = {(f.node, f.op_type): f.reason for f in trt_fusion_lint(helper.make_model(graph))}
    assert set(findings) == {("dq", "DequantizeLinear"), ("add", "Add")}
    assert "stranded before ['Sigmoid']" in findings[("dq", "DequantizeLinear")]
    assert "does not come from a Conv/Gemm" in findings[("add", "Add")]
