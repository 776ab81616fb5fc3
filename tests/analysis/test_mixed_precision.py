"""Mixed precision on the digits CNN at W4A4: the fewest float layers that reach the accuracy target; the float
layers stay float in ONNX and ONNX Runtime still fuses the rest."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import replace

import onnx
import pytest
import torch
from onnx import numpy_helper

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.analysis.mixed_precision import mixed_precision
from fxquant.cli.demo_model import accuracy
from fxquant.lower.onnx_export import ort_session

W4A4 = QuantConfig(weight=QuantSpec(4, axis=0, narrow_range=True),
                   activation=QuantSpec(4, symmetric=False, calib_method="mse"))


@pytest.fixture(scope="module")
def w4a4(digits):
    model, (x_train, _, x_test, y_test) = digits
    batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
    fp32 = accuracy(model, x_test, y_test)
    result = mixed_precision(model, x_test[:1], batches, backend="onnxruntime", config=W4A4,
                             metric=lambda m: accuracy(m, x_test, y_test), target=fp32 - 0.5, progress=False)
    return result, fp32, batches


@pytest.mark.zoo  # the W4A4 search (sensitivity + trials): about 2 minutes on 2 cores
def test_w4a4_accuracy_improves_with_the_fewest_float_layers(digits, w4a4):
    model, (_, _, x_test, y_test) = digits
    result, fp32, batches = w4a4
    all_quantized = result.quantized_value
    assert fp32 >= 96.0 and all_quantized < result.target  # W4A4 everywhere misses the target
    assert result.reached and result.value >= fp32 - 0.5 and result.value > all_quantized
    n = len(result.float_layers)
    assert 1 <= n < len(result.sensitivity.layers)
    assert [t[0] for t in result.trials] == list(range(n + 1))
    assert result.trials[-1][1] == pytest.approx(result.value)  # the search saw what the rebuilt model does
    assert accuracy(result.model, x_test, y_test) == pytest.approx(result.value)
    # minimal: the same config with one float layer fewer, built from scratch, misses the target
    fewer = replace(result.config, overrides=result.config.overrides[:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float ops of the exclusions
        qmodel = fxquant.quantize(model, x_test[:1], batches, backend="onnxruntime", config=fewer, progress=False)
    assert accuracy(qmodel, x_test, y_test) < result.target
    details = " ".join(e.detail for e in fxquant.report_of(result.model).float_ops)
    assert all(f"Override({name!r})" in details for name in result.float_layers)
    assert "kept float" in result.summary()


@pytest.mark.zoo  # the W4A4 search (sensitivity + trials): about 2 minutes on 2 cores
def test_float_layers_stay_float_in_onnx_and_ort_fuses_the_rest(digits, w4a4, tmp_path):
    """The chosen exclusions at the default 8-bit onnxruntime preset: the excluded convs are float Conv with
    float weights in the exported model and in ORT's optimized graph; every other conv is a QLinearConv."""
    model, (_, _, x_test, y_test) = digits
    result, fp32, batches = w4a4
    config = QuantConfig(overrides=result.config.overrides)
    with pytest.warns(UserWarning, match="stay float"):
        qmodel = fxquant.quantize(model, x_test[:1], batches, backend="onnxruntime", config=config, progress=False)
    exported = fxquant.export_onnx(qmodel, x_test[:32], tmp_path / "mixed.onnx")
    assert exported.ort_sqnr_db >= 35.0
    graph = exported.model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    convs = {n.name.removesuffix("/Conv"): n for n in graph.node if n.op_type == "Conv"}
    float_convs = {name for name in result.float_layers if name in convs}
    for name, node in convs.items():
        weight_dequantized = node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear"
        assert weight_dequantized == (name not in float_convs), name
        if name in float_convs:
            assert numpy_helper.to_array(inits[node.input[1]]).dtype.name == "float32"
    meta = {p.key: p.value for p in exported.model.metadata_props}
    assert set(meta["fxquant.float_ops"].split(",")) >= {name.replace(".", "_") for name in float_convs}
    optimized = str(tmp_path / "optimized.onnx")
    session = ort_session(exported.path, optimized_path=optimized, level="all")
    ops = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert ops["QLinearConv"] == len(convs) - len(float_convs), ops
    assert ops["Conv"] + ops["FusedConv"] == len(float_convs), ops
    assert ops["QGemm"] == (0 if "fc" in result.float_layers else 1), ops
    assert accuracy(lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), x_test,
                    y_test) >= fp32 - 0.5


def test_sqnr_target_and_bad_arguments(digits):
    model, (x_train, _, x_test, _) = digits
    batches = [x_train[:128]]
    result = mixed_precision(model, x_test[:1], batches, backend="tensorrt", config=replace(
        W4A4, activation=QuantSpec(4, calib_method="mse")), target_sqnr=15.0, progress=False)
    assert result.measure == "sqnr_db" and result.reached and result.value >= 15.0 > result.quantized_value
    assert all(value < 15.0 for _, value in result.trials[:-1])
    with pytest.raises(ValueError, match="exactly one of"):
        mixed_precision(model, x_test[:1], batches, target_sqnr=20.0, metric=len, target=1.0)
    with pytest.raises(ValueError, match="callable"):
        mixed_precision(model, x_test[:1], batches, metric=len)
