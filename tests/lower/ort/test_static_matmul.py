"""Float-output Linears of the onnxruntime preset export as MatMulIntegerToFloat (fxquant.lower.ort.static_matmul)."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxquant
from fxquant.lower.ort.latency import float_twin


class Block(nn.Module):
    """A post-norm transformer FFN: Linear -> GELU -> Linear -> residual add -> LayerNorm, then a head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x + self.down(nn.functional.gelu(self.up(x))))
        return self.head(y)


def _optimized(proto: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _quantize_export(backend: str, tmp_path, shape=(1, 12, 32)):
    torch.manual_seed(0)
    model = Block().eval()
    data = [torch.randn(*shape) for _ in range(4)]
    qmodel = fxquant.quantize(model, data[0], data, backend=backend, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxquant.export_onnx(qmodel, data[0], tmp_path / f"{backend}.onnx", check_latency=False)
    return model, data, qmodel, result


@pytest.mark.parametrize("shape", [(1, 12, 32), (6, 32)])
def test_float_output_linears_run_as_integer_kernels(tmp_path, shape):
    model, data, qmodel, result = _quantize_export("onnxruntime", tmp_path, shape)
    ops = result.op_counts
    # up feeds GELU, down feeds the residual add before the LayerNorm: float outputs. The head's output leaves
    # the model, which decides nothing (placed as inside a network): uint8 output, QGemm
    assert ops["MatMulIntegerToFloat"] == 2
    assert {n.name for n in result.model.graph.node if n.op_type == "MatMulIntegerToFloat"} == {
        "up/MatMulIntegerToFloat", "down/MatMulIntegerToFloat"}
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)
    graph = _optimized(result.model).graph
    optimized = Counter(n.op_type for n in graph.node)
    # all three Linears run in integer kernels (the head's: QGemm, or ORT's own MatMulIntegerToFloat + Q in 3-D)
    assert optimized["MatMulIntegerToFloat"] + optimized["QGemm"] + optimized["QLinearMatMul"] == 3
    assert optimized["MatMulIntegerToFloat"] >= 2
    # every weight stays int8 inside a fused op: no weight is dequantized at run time, no float Gemm
    assert optimized["Gemm"] == optimized["MatMul"] == optimized["FusedMatMul"] == 0
    constants = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert result.ort_sqnr_db > 35.0  # ORT's integer arithmetic against the fake-quant model
    with torch.no_grad():
        assert fxquant.sqnr(model(data[1]), qmodel(data[1])) > 25.0


def test_tensorrt_graph_keeps_plain_qdq(tmp_path):
    _, _, _, result = _quantize_export("tensorrt", tmp_path)
    assert result.op_counts["MatMulIntegerToFloat"] == 0
    assert not any(o.domain == "com.microsoft" for o in result.model.opset_import)


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime_dynamic"])
def test_float_twin_has_no_integer_op(tmp_path, backend):
    model, data, _, result = _quantize_export(backend, tmp_path)
    twin = float_twin(result.model)
    ops = Counter(n.op_type for n in twin.graph.node)
    integer = {"MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear",
               "DequantizeLinear"}
    assert not set(ops) & integer
    assert ops["MatMul"] == 3
    onnx.checker.check_model(twin)
    session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: data[1].numpy()})[0])
    with torch.no_grad():  # only the weights' 8-bit codes remain
        assert fxquant.sqnr(model(data[1]), got) > 30.0
