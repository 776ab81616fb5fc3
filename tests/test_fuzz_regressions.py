"""Minimal regression tests for the bugs tests/test_fuzz.py found, one per bug class."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant


def _prepared(model: nn.Module, x: torch.Tensor, backend: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ops that stay float warn
        return fxquant.prepare(model, x, backend=backend)


class CatOnly(nn.Module):
    def forward(self, x):
        y = torch.cat([x, x], 1)
        return torch.cat([y, y], 1)


def test_nothing_to_quantize_names_the_ops():
    """A model in which no op needs a quantizer (concats of the input on TensorRT): the error says so and names
    the ops, instead of telling the user to call prepare() they just called."""
    x = torch.randn(2, 6, 8)
    prepared = _prepared(CatOnly(), x, "tensorrt")
    with pytest.raises(fxquant.CalibrationError, match=r"none of its ops \(cat \(cat\), cat_1 \(cat\)\) needs one"):
        fxquant.calibrate(prepared, [x], progress=False)


def test_op_without_onnx_translation_is_a_conversion_error(tmp_path):
    """Adaptive max pooling to a size that does not divide the input has no torch.onnx translation: export_onnx
    raises fxquant's ConversionError naming the ATen op (not torch's raw exporter error), writes no file, and
    does not retry with a static batch after warning that the dynamic one failed."""
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.AdaptiveMaxPool2d(2)).eval()
    x = torch.randn(2, 2, 5, 5)
    prepared = _prepared(model, x, "onnxruntime")
    fxquant.calibrate(prepared, [x], progress=False)
    qmodel = fxquant.convert(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(fxquant.ConversionError, match=r"no ONNX translation for `aten\.adaptive_max_pool2d"):
            fxquant.export_onnx(qmodel, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class SharedBiasConv(nn.Module):
    """One Conv with a bias called twice (on inputs of different ranges): ORT gives each call an int32 bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


@pytest.mark.smoke
def test_shared_conv_bias_gets_one_int32_bias_per_call(tmp_path):
    """The ORT bias pass named both int32 copies `conv.bias_quantized`: onnx.checker refused the duplicate."""
    x = torch.randn(2, 4, 6, 6)
    prepared = _prepared(SharedBiasConv().eval(), x, "onnxruntime")
    fxquant.calibrate(prepared, [x], progress=False)
    result = fxquant.export_onnx(fxquant.convert(prepared), x, tmp_path / "m.onnx")
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))
    biases = sorted(t.name for t in result.model.graph.initializer if t.data_type == 6 and "zero_point" not in t.name)
    assert biases == ["conv.bias_1_quantized", "conv.bias_quantized"]  # int32, one per call
    assert result.ort_sqnr_db >= 30
