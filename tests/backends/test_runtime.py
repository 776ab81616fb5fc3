"""What each backend's runtime can run (issue 21 section 3): specs TensorRT refuses are named at prepare,
dynamic activations never reach an op the runtime has no dynamic kernel for, and the report says so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Override, QuantConfig, QuantSpec
from fxquant.errors import ConfigError

README_CONFIG = QuantConfig(weight=QuantSpec(num_bits=8, axis=0, narrow_range=True),
                            activation=QuantSpec(num_bits=8, symmetric=False))  # README's example


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(y.mean((2, 3)))


def _x(n: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(n))


def test_the_readme_config_on_tensorrt_warns_that_tensorrt_refuses_it():
    # before: a QuantizeLinear with a uint8 zero point of 113 was exported for TensorRT without a word
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"tensorrt: the activation spec is affine \(symmetric=False\): a "
                                         r"QuantizeLinear with a zero point other than 0, which TensorRT does not "
                                         r"run;\s+the fake-quant model simulates these specs, but TensorRT will refuse"
                                         r" or change the exported model: use symmetric signed 8-bit specs"):
        prepared = fxquant.prepare(ConvNet().eval(), _x(), config=README_CONFIG)
    assert any("which TensorRT does not run" in n for n in fxquant.report_of(prepared).notes)
    with warnings.catch_warnings(record=True) as caught:  # the same config for ONNX Runtime, and the defaults: fine
        warnings.simplefilter("always")
        fxquant.prepare(ConvNet().eval(), _x(), backend="onnxruntime", config=README_CONFIG)
        fxquant.prepare(ConvNet().eval(), _x())
    assert not any("does not run" in str(w.message) for w in caught)


@pytest.mark.parametrize(("spec", "problem"), [
    (QuantSpec(unsigned=True), "unsigned=True: uint8 codes"),
    (QuantSpec(num_bits=16), "num_bits=16: 16-bit Q/DQ"),
])
def test_other_specs_tensorrt_cannot_run_are_named(spec, problem):
    with pytest.warns(UserWarning, match=f"the activation spec of Override\\('conv2'\\) is {problem}"):
        fxquant.prepare(ConvNet().eval(), _x(), config=QuantConfig(overrides=(Override("conv2", activation=spec),)))


def test_dynamic_activations_on_tensorrt_are_refused():
    # before: accepted, and exported as DynamicQuantizeLinear, which TensorRT cannot run
    with pytest.raises(ConfigError, match=r"the tensorrt backend targets TensorRT, which cannot run dynamic "
                                          r"activations .* or backend='onnxruntime_dynamic'"):
        fxquant.prepare(ConvNet().eval(), _x(), config=QuantConfig(activation=QuantSpec(dynamic=True,
                                                                                        symmetric=False)))


def test_dynamic_activations_reach_only_linears_on_onnx_runtime(tmp_path):
    # before: the convs exported as DynamicQuantizeLinear -> DequantizeLinear -> float Conv, reported as quantized
    torch.manual_seed(0)
    config = QuantConfig(activation=QuantSpec(dynamic=True, symmetric=False))
    with pytest.warns(UserWarning, match=r"op\(s\) stay float"):
        prepared = fxquant.prepare(ConvNet().eval(), _x(), backend="onnxruntime", config=config)
    report = fxquant.report_of(prepared)
    assert [e.node for e in report.quantized] == ["fc"]
    floats = {e.node: e.detail for e in report.float_ops}
    assert floats["conv1"].startswith("ONNX Runtime runs dynamic activations (QuantSpec(dynamic=True), "
                                      "DynamicQuantizeLinear) only into linear layers")
    assert "conv2" in floats
    assert not hasattr(prepared.conv1, "weight_quantizer") and not hasattr(prepared.conv2, "weight_quantizer")
    fxquant.calibrate(prepared, [_x(1), _x(2)], progress=False)
    result = fxquant.export_onnx(fxquant.convert(prepared), _x(), tmp_path / "m.onnx", check_latency=False)
    assert result.op_counts["Conv"] == 2 and result.op_counts["MatMulInteger"] == 1
    producers = {o: n for n in result.model.graph.node for o in n.output}
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    # float convs, with no fake quantize-dequantize before them
    assert all(getattr(producers.get(c.input[0]), "op_type", None) != "DequantizeLinear" for c in convs)
    assert result.ort_sqnr_db > 30
