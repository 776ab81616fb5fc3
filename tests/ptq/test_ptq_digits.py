"""Real data: the PTQ passes on a MobileNet-style digits CNN with badly balanced channels (see
``unbalance_channels``: training alone leaves them balanced, so the imbalance is made explicitly, preserving
the function). Per-tensor INT8 fails without equalization and recovers with it; AdaRound beats round-to-nearest
at W4A8 and its codes survive ONNX export exactly; bias correction recovers W4 per-tensor SQNR."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from onnx import numpy_helper

import fxquant
from fxquant.cli.demo_model import accuracy, load_digits_split
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.ptq.bias_correction import relu_normal_mean
from fxquant.ptq.layers import channel_sum, float_mode, layer_activations, quantized_layers
from fxquant.ptq.weight_widths import reduction_rows, saturating_pairs
from tests.models.mobilenet_digits import train_mobilenet_digits, unbalance_channels

W8_PER_TENSOR = fxquant.QuantSpec(num_bits=8, axis=None, narrow_range=True)
W4_PER_CHANNEL = fxquant.QuantSpec(num_bits=4, axis=0, narrow_range=True)
W4_PER_TENSOR = fxquant.QuantSpec(num_bits=4, axis=None, narrow_range=True)
FAST_ADAROUND = fxquant.AdaRoundOptions(iterations=150, batch_size=32)


@pytest.fixture(scope="module")
def digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and the machine is shared
    data = load_digits_split(seed=0)
    model = unbalance_channels(train_mobilenet_digits(epochs=6, seed=0, data=data), spread=2.0)
    x_train = data[0]
    batches = [x_train[i:i + 64] for i in range(0, 512, 64)]
    yield model, data, batches
    torch.set_num_threads(threads)


def _quantize(model, data, batches, **config):
    return fxquant.quantize(model, data[2][:1], batches, config=fxquant.QuantConfig(**config), progress=False)


def test_per_tensor_int8_needs_equalization(digits, tmp_path):
    model, (_, _, x_test, y_test), batches = digits
    fp32 = accuracy(model, x_test, y_test)
    assert fp32 >= 96.0
    plain = accuracy(_quantize(model, digits[1], batches, weight=W8_PER_TENSOR), x_test, y_test)
    assert plain <= fp32 - 20.0  # a few channels own the per-tensor range
    qmodel = _quantize(model, digits[1], batches, weight=W8_PER_TENSOR, equalize=True)
    assert accuracy(qmodel, x_test, y_test) >= fp32 - 1.0
    result = fxquant.export_onnx(qmodel, x_test[:32], tmp_path / "cle.onnx")
    assert result.ort_sqnr_db >= 30.0
    session = ort_session(result.path, level="basic")
    assert accuracy(lambda x: run_ort(session, (x,))[0], x_test, y_test) >= fp32 - 1.0


def test_adaround_beats_round_to_nearest_and_exports_its_codes(digits, tmp_path):
    model, data, batches = digits
    x_test, y_test = data[2], data[3]
    with torch.no_grad():
        ref = model(x_test)
    nearest = _quantize(model, data, batches, weight=W4_PER_CHANNEL, equalize=True)
    prepared = fxquant.prepare(model, x_test[:1], config=fxquant.QuantConfig(
        weight=W4_PER_CHANNEL, equalize=True, adaround=FAST_ADAROUND))
    fxquant.calibrate(prepared, batches, progress=False)  # calibrates, then runs AdaRound on the same batches
    rounded = fxquant.convert(prepared)
    acc_nearest, acc_ada = accuracy(nearest, x_test, y_test), accuracy(rounded, x_test, y_test)
    sqnr_nearest, sqnr_ada = fxquant.sqnr(ref, nearest(x_test)), fxquant.sqnr(ref, rounded(x_test))
    assert acc_ada >= acc_nearest + 0.6, (acc_nearest, acc_ada)
    assert sqnr_ada >= sqnr_nearest + 4.0, (sqnr_nearest, sqnr_ada)
    report = fxquant.report_of(prepared).ptq["adaround"]
    codes = report.data["codes"]
    assert len(report.done) == 8 and not report.skipped
    assert all(row["mse_reconstructed"] < row["mse_nearest"] for row in report.data["blocks"].values())
    result = fxquant.export_onnx(rounded, x_test[:32], tmp_path / "adaround.onnx")
    assert result.ort_sqnr_db >= 30.0
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name, layer_codes in codes.items():  # the learned rounding, code for code, in the ONNX file
        onnx_codes = inits[f"{name}.weight_quantized"]
        assert onnx_codes.dtype == np.int8
        np.testing.assert_array_equal(onnx_codes, layer_codes.numpy())
        assert 0 < (layer_codes != torch.round(  # and it is not round-to-nearest of the float weights
            dict(nearest.named_modules())[name].weight / dict(rounded.named_modules())[name]
            .weight_quantizer.scale.view(-1, *[1] * (layer_codes.dim() - 1)))).sum()


def test_adaround_as_a_function_and_recalibration_keeps_its_codes(digits):
    model, data, batches = digits
    prepared = fxquant.prepare(model, data[2][:1], config=fxquant.QuantConfig(weight=W4_PER_TENSOR, equalize=True))
    with pytest.raises(RuntimeError, match="calibrate"):
        fxquant.adaround(prepared, batches)
    fxquant.calibrate(prepared, batches, progress=False)
    report = fxquant.adaround(prepared, batches, fxquant.AdaRoundOptions(iterations=20), progress=False)
    layers = dict(prepared.named_modules())

    def codes_now():
        return {n: torch.round(layers[n].weight / layers[n].weight_quantizer.scale) for n in report.data["codes"]}

    assert all(torch.equal(codes_now()[n], c.float()) for n, c in report.data["codes"].items())
    fxquant.calibrate(prepared, batches[:2], progress=False)  # activations re-derived, AdaRound weights kept
    assert all(torch.equal(codes_now()[n], c.float()) for n, c in report.data["codes"].items())


def test_bias_correction_recovers_w4_per_tensor(digits):
    model, data, batches = digits
    x_test = data[2]
    with torch.no_grad():
        ref = model(x_test)
    base = dict(weight=W4_PER_TENSOR, equalize=True)
    plain = fxquant.sqnr(ref, _quantize(model, data, batches, **base)(x_test))
    empirical = _quantize(model, data, batches, **base, bias_correction=True)
    analytical = _quantize(model, data, batches, **base, bias_correction="analytical")
    assert fxquant.sqnr(ref, empirical(x_test)) >= plain + 4.0
    assert fxquant.sqnr(ref, analytical(x_test)) >= plain + 3.0
    report = fxquant.report_of(analytical).ptq["bias_correction"]
    assert len(report.done) == 7  # every layer fed by a folded conv -> BN -> ReLU
    assert report.skipped == ["`features.0`: its input does not come from a folded Conv/Linear -> BatchNorm "
                              "(-> ReLU)"]
    assert len(fxquant.report_of(empirical).ptq["bias_correction"].done) == 8


def test_empirical_bias_correction_zeroes_every_layers_mean_error(digits):
    model, data, batches = digits
    config = fxquant.QuantConfig(weight=W4_PER_TENSOR, equalize=True)
    prepared = fxquant.prepare(model, data[2][:1], config=config)
    fxquant.calibrate(prepared, batches, progress=False)

    layers, _ = quantized_layers(prepared)

    def means(ctx):  # per layer and channel, the output mean over the calibration batches
        with ctx:
            return {layer.name: _mean(layer_activations(prepared, layer.module, batches, "output",
                                              reduce=channel_sum(layer.channel_dim))) for layer in layers}

    reference = means(float_mode(prepared))  # the float model, before biases change
    before = means(contextlib.nullcontext())
    fxquant.correct_bias(prepared, batches, "empirical", progress=False)
    after = means(contextlib.nullcontext())
    err_before = {n: float((before[n] - reference[n]).abs().max()) for n in reference}
    err_after = {n: float((after[n] - reference[n]).abs().max()) for n in reference}
    assert max(err_before.values()) > 0.05
    assert all(err_after[n] < 1e-4 for n in err_after), err_after


def _mean(parts):
    return sum(s for s, _ in parts) / sum(c for _, c in parts)


def test_adaround_codes_are_exact_in_onnx_for_the_onnxruntime_preset(digits, tmp_path):
    model, data, batches = digits
    x_test = data[2]
    prepared = fxquant.prepare(model, x_test[:1], backend="onnxruntime", config=fxquant.QuantConfig(
        equalize=True, adaround=fxquant.AdaRoundOptions(iterations=30)))
    fxquant.calibrate(prepared, batches, progress=False)
    codes = fxquant.report_of(prepared).ptq["adaround"].data["codes"]
    result = fxquant.export_onnx(fxquant.convert(prepared), x_test[:32], tmp_path / "ort_adaround.onnx")
    assert result.ort_sqnr_db >= 30.0
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert len(codes) == 8
    for name, layer_codes in codes.items():  # saturation-aware 8-bit weights: AdaRound's codes overflow no pair
        assert int(layer_codes.abs().max()) <= 127
        groups = getattr(prepared.get_submodule(name), "groups", 1)
        rows = reduction_rows(layer_codes, "linear" if layer_codes.dim() == 2 else "conv", groups)
        assert rows is None or int(saturating_pairs(rows).sum()) == 0
        np.testing.assert_array_equal(inits[f"{name}.weight_quantized"], layer_codes.numpy())


def test_relu_of_normal_mean_matches_sampling():
    mean = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0, 1.0])
    std = torch.tensor([1.0, 0.3, 2.0, 1.5, 0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    samples = torch.relu(mean + std * torch.randn(400_000, 6, generator=g)).mean(0)
    torch.testing.assert_close(relu_normal_mean(mean, std), samples, atol=6e-3, rtol=0)
