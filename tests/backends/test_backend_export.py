"""A backend declares where it deploys (``runtime``) and the ONNX passes export runs for it (``export_passes``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxquant
from fxquant import BACKENDS, ConfigError
from fxquant.lower.export_passes import EXPORT_PASSES


def test_backends_declare_runtime_and_known_passes():
    assert {name: (b.runtime, b.export_passes) for name, b in BACKENDS.items()} == {
        "tensorrt": ("tensorrt", ()),
        "onnxruntime": ("onnxruntime", ("ort_cpu_graph", "integer_float_output", "int32_bias")),
        "onnxruntime_dynamic": ("onnxruntime", ("ort_cpu_graph",)),
    }
    assert {b.verify_level for b in BACKENDS.values() if b.runtime == "onnxruntime"} == {"all"}
    with pytest.raises(ConfigError, match=r"unknown pass\(es\) \['int32_biases'\]; valid: .*'int32_bias'"):
        dataclasses.replace(BACKENDS["tensorrt"], export_passes=("int32_biases",))
    with pytest.raises(ConfigError, match=r"Backend\.runtime must be one of"):
        dataclasses.replace(BACKENDS["tensorrt"], runtime="tflite")
    assert sorted(EXPORT_PASSES) == ["int32_bias", "integer_float_output", "ort_cpu_graph"]


def _int32_biases(proto: onnx.ModelProto) -> list[str]:
    return sorted(t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT32)


def test_a_custom_backend_gets_the_passes_it_declares(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    trt_int32 = dataclasses.replace(BACKENDS["tensorrt"], name="trt_int32", export_passes=("int32_bias",))
    exported = {}
    for backend in (BACKENDS["tensorrt"], trt_int32):
        qmodel = fxquant.quantize(model, x, [x, torch.randn(2, 3, 8, 8)], backend=backend, progress=False)
        result = fxquant.export_onnx(qmodel, x, tmp_path / f"{backend.name}.onnx", check_latency=False)
        assert result.ort_sqnr_db > 35.0
        assert result.trt_lint == [] and result.fusion is None  # runtime "tensorrt": linted, not fused in ORT
        exported[backend.name] = result.model
    assert _int32_biases(exported["tensorrt"]) == []
    # both convs read a dequantized input and weight: their biases become int32 codes at s_x * s_w
    assert _int32_biases(exported["trt_int32"]) == ["0.bias_quantized", "0.bias_quantizer.zero_point",
                                                    "2.bias_quantized", "2.bias_quantizer.zero_point"]
    for conv in ("0", "2"):
        codes = numpy_helper.to_array(next(t for t in exported["trt_int32"].graph.initializer
                                           if t.name == f"{conv}.bias_quantized"))
        assert codes.shape == (model[int(conv)].out_channels,) and np.abs(codes).max() > 100
