"""export_onnx's latency check: the int8 ORT model against its float twin (fxquant.lower.ort.latency)."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import fxquant
from fxquant.lower.ort.latency import float_twin


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _export(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.rand(4, 3, 16, 16) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = fxquant.quantize(model, data[0][:1], data, backend="onnxruntime", progress=False)
        result = fxquant.export_onnx(qmodel, data[0][:1], tmp_path / "net.onnx", **kwargs)
    return model, data, result, [str(w.message) for w in caught]


def test_float_twin_is_the_float_model(tmp_path):
    model, data, result, _ = _export(tmp_path, check_latency=False)
    twin = float_twin(result.model)
    ops = {n.op_type for n in twin.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data[1].numpy()})[0]
    with torch.no_grad():
        expected = model(data[1])
    # only the weights are quantized in the twin (8-bit codes): far closer than the int8 model itself
    assert fxquant.sqnr(expected, torch.from_numpy(got)) > 30.0


def test_latency_is_measured_and_a_slower_int8_model_warns(tmp_path):
    _, _, result, messages = _export(tmp_path)
    check = result.latency
    assert check is not None and check.runs == 30
    assert check.int8_ms > 0 and check.float_ms > 0
    assert check.int8_iqr_ms[0] <= check.int8_ms <= check.int8_iqr_ms[1]
    warned = any("runs slower in ONNX Runtime than its float twin" in m for m in messages)
    assert warned == check.slower
    assert np.isclose(check.speedup, check.float_ms / check.int8_ms)


def test_the_check_can_be_skipped_and_is_off_for_tensorrt(tmp_path):
    assert _export(tmp_path, check_latency=False)[2].latency is None
    torch.manual_seed(0)
    data = [torch.rand(2, 3, 16, 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(Net().eval(), data[0], data, backend="tensorrt", progress=False)
        assert fxquant.export_onnx(qmodel, data[0], tmp_path / "trt.onnx").latency is None
