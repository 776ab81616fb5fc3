"""export_onnx reports the ops meant to run in int8 that ORT left in float (fxquant.lower.ort.fusion)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends.onnxruntime import ONNXRUNTIME


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _export(backend, tmp_path, config=None, opset=18):
    torch.manual_seed(0)
    data = [torch.rand(2, 3, 8, 8) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = fxquant.quantize(Net().eval(), data[0], data, backend=backend, config=config, progress=False)
        result = fxquant.export_onnx(qmodel, data[0], tmp_path / "net.onnx", opset=opset)
    return result, [str(w.message) for w in caught]


def test_preset_model_fuses_every_int8_op(tmp_path):
    result, messages = _export("onnxruntime", tmp_path)
    # conv1, conv2, the residual add, the global average pool and fc sit between Q/DQ: all fuse
    assert result.fusion.intended == 5
    assert result.fusion.unfused == []
    assert result.fusion.optimized_ops.get("QLinearConv") == 2
    assert not any("meant to run in int8" in m for m in messages)


def test_16_bit_activations_are_reported_with_their_reason(tmp_path):
    config = fxquant.QuantConfig(activation=ONNXRUNTIME.activation.with_(num_bits=16))
    result, messages = _export("onnxruntime", tmp_path, config, opset=21)
    unfused = result.fusion.unfused
    assert sorted(u.op_type for u in unfused) == ["Add", "Conv", "Conv", "Gemm", "GlobalAveragePool"]
    assert all("UINT16: ORT's int8 kernels take 8-bit integers only" in u.reason for u in unfused), unfused
    assert any("ORT fused 0 of 5 ops meant to run in int8" in m for m in messages)


def test_tensorrt_preset_is_not_checked_for_ort_fusion(tmp_path):
    result, _ = _export("tensorrt", tmp_path)
    assert result.fusion is None


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
