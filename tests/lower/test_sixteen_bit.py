"""16-bit Q/DQ (opset 21) through the onnxruntime backend's ORT-specific export passes (issue 21 section 3): the
rewrites made for ORT's 8-bit kernels leave 16-bit tensors alone, and a raw ORT error never reaches the user."""

from __future__ import annotations

import warnings
from collections import Counter

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.backends.onnxruntime import ONNXRUNTIME
from fxquant.errors import ExportError


class MLP(nn.Module):
    """A Linear whose output only reaches float ops (GELU): the onnxruntime preset's MatMulIntegerToFloat case."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.conv1.bias.fill_(2.0)  # a bias 16-bit scales cannot hold in int32

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _export(model: nn.Module, x: torch.Tensor, bits: int, tmp_path, weight_bits: int = 8, **kwargs):
    torch.manual_seed(0)
    config = fxquant.QuantConfig(activation=ONNXRUNTIME.activation.with_(num_bits=bits),
                                 weight=ONNXRUNTIME.weight.with_(num_bits=weight_bits))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-bit ops do not fuse in ORT: export warns so
        qmodel = fxquant.quantize(model.eval(), x, [x], backend="onnxruntime", config=config, progress=False)
        return fxquant.export_onnx(qmodel, x, tmp_path / f"m{bits}.onnx", opset=21, check_latency=False, **kwargs)


def test_16_bit_linears_with_a_float_output_stay_in_qdq_form(tmp_path):
    # before: MatMulIntegerToFloat got uint16 codes and ORT refused the file with a raw InvalidGraph
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    eight = _export(model, x, 8, tmp_path)
    assert eight.op_counts["MatMulIntegerToFloat"] == 1
    sixteen = _export(model, x, 16, tmp_path)
    assert sixteen.op_counts["MatMulIntegerToFloat"] == 0 and sixteen.ort_sqnr_db > 60
    types = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in sixteen.model.graph.initializer
                    if t.name.endswith("zero_point"))
    assert types["UINT16"] >= 2


def test_16_bit_weights_under_8_bit_activations_stay_in_qdq_form(tmp_path):
    # the weight's width decides too: ORT's integer matmuls (MatMulIntegerToFloat, MatMulInteger) take 8-bit
    # weights only; a uint8 input with an int16 weight must keep the QDQ form ORT runs dequantized
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    result = _export(model, x, 8, tmp_path, weight_bits=16)
    assert result.op_counts["MatMulIntegerToFloat"] == 0 and result.ort_sqnr_db > 30
    weights = [t for t in result.model.graph.initializer if t.name.endswith("weight_quantized")]
    assert weights and {onnx.TensorProto.DataType.Name(t.data_type) for t in weights} == {"INT16"}


def test_16_bit_weights_keep_a_bias_int32_cannot_hold_in_float(tmp_path):
    # before: the int32 bias (scale s_x * s_w ~ 1e-9) saturated, in fxquant's pass or in ORT's WeightBiasQuantization
    # after it: ORT agreed with the fake-quant model at 13.2 dB
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    result = _export(Conv(), x, 16, tmp_path, weight_bits=16)
    assert result.ort_sqnr_db > 60
    adds = [n.name for n in result.model.graph.node if n.op_type == "Add" and n.name.endswith("_bias")]
    assert adds == ["conv1/Conv_bias"]  # conv1's bias of 2.0 after the Conv, in float; conv2's fits int32
    eight = _export(Conv(), x, 8, tmp_path, weight_bits=7)  # 7-bit: full 8-bit codes saturate ORT's u8s8 sums
    assert eight.ort_sqnr_db > 30  # on CPUs without VNNI, which would make this figure depend on the CPU
    assert not any(n.name.endswith("_bias") for n in eight.model.graph.node)


def test_a_graph_ort_cannot_load_is_an_export_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Type Error: Type 'tensor(uint16)' of input")

    monkeypatch.setattr("fxquant.lower.onnx_export.run_as", refuse)
    with pytest.raises(ExportError, match=r"ONNX Runtime cannot run the exported model, though onnx\.checker accepts "
                                          r"it: RuntimeError: .*INVALID_GRAPH.*pass verify=False to write the file"):
        _export(MLP(), torch.randn(4, 16), 16, tmp_path)
    assert not (tmp_path / "m16.onnx").exists()
    assert _export(MLP(), torch.randn(4, 16), 16, tmp_path, verify=False).ort_sqnr_db is None
    assert (tmp_path / "m16.onnx").exists()
