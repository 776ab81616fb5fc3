"""Calibration of prepared models: re-derived ranges, calibration methods named and validated, all-zero and
non-finite data, models without quantizers, disabled quantizers (split from test_calibrators.py)."""

from __future__ import annotations

import math
import warnings

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec, TensorQuantizer
from fxquant.calib import CALIBRATORS, EmaCalibrator, HistogramCalibrator, MaxCalibrator
from tests.calib.calibrated import calibrated, histogram


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def _prepared(method: str, backend: str = "tensorrt"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(_Net().eval(), torch.zeros(1, 3, 8, 8), backend=backend,
                               config=QuantConfig(activation=QuantSpec(calib_method=method)))


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=g) * (1 + torch.rand(4, 3, 8, 8, generator=g) ** 8 * 10)
            for _ in range(3)]


def _scales(model) -> dict[str, torch.Tensor]:
    return {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def test_load_calib_amax_on_a_prepared_model():
    prepared = fxquant.calibrate(_prepared("entropy"), _data(), progress=False)
    entropy = _scales(prepared)
    act = [n for n in entropy if not n.endswith("weight_quantizer")]
    assert len(act) == 2
    for method in ("mse", "percentile", "max"):
        reference = _scales(fxquant.calibrate(_prepared(method), _data(), progress=False))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fxquant.load_calib_amax(prepared, method)
        if method == "max":
            assert not record  # every quantizer (the max-calibrated weights too) can give "max"
        else:  # the per-channel max weight quantizers keep their range, and say so
            assert len(record) == 1 and "2 quantizer(s) keep their range" in str(record[0].message)
            assert "conv1.weight_quantizer, conv2.weight_quantizer" in str(record[0].message)
        got = _scales(prepared)
        for name, scale in reference.items():
            assert torch.equal(got[name], scale), (method, name)
        assert any(not torch.equal(entropy[n], reference[n]) for n in act), method  # the methods differ here
    with pytest.warns(UserWarning):
        fxquant.load_calib_amax(prepared, "entropy")
    assert all(torch.equal(_scales(prepared)[n], entropy[n]) for n in entropy)
    with pytest.warns(UserWarning):
        fxquant.load_calib_amax(prepared, "percentile", percentile=99.0)
    for name, q in prepared.named_modules():
        if name in act:
            assert q.spec.percentile == 99.0
            assert torch.equal(q._max, q.calibrator.compute(QuantSpec(calib_method="percentile", percentile=99.0))[1])


# ---- bad input ---------------------------------------------------------------------------------------------


def test_unknown_calib_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        QuantSpec(calib_method="kl")
    msg = str(info.value)
    assert "QuantSpec.calib_method='kl' is unknown" in msg
    assert f"valid methods: {sorted(CALIBRATORS)}" in msg
    assert sorted(CALIBRATORS) == ["ema", "entropy", "max", "mse", "percentile"]
    q = calibrated(QuantSpec(calib_method="mse"), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match=r"cannot derive a 'kl' range \(it can: \['max', 'percentile', 'entropy', "
                                         r"'mse'\]\)"):
        q.load_calib_amax("kl")


@pytest.mark.parametrize("bad", [0, 101, -1, 100.0001])
def test_percentile_out_of_range(bad):
    with pytest.raises(ValueError, match=r"QuantSpec.percentile must be in \(0, 100\]"):
        QuantSpec(calib_method="percentile", percentile=bad)
    prepared = fxquant.calibrate(_prepared("percentile"), _data(), progress=False)
    before = _scales(prepared)
    with pytest.raises(ValueError, match=r"QuantSpec.percentile must be in \(0, 100\]"):
        fxquant.load_calib_amax(prepared, "percentile", percentile=bad)
    assert all(torch.equal(_scales(prepared)[n], s) for n, s in before.items())


@pytest.mark.parametrize("method", ["max", "ema", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_data_gives_amax_zero_and_zero_outputs(method, symmetric):
    spec = QuantSpec(calib_method=method, symmetric=symmetric)
    q = calibrated(spec, torch.zeros(5, 7), torch.zeros(3))
    assert q.amax.item() == 0.0
    assert math.isfinite(q.scale.item()) and q.scale.item() > 0
    assert q.zero_point.item() == 0.0
    x = torch.tensor([0.0, 1.0, -2.0, 3.5])
    out = q(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(x)) if symmetric else out[0].item() == 0.0


def _zero_calibrated_export(backend: str, tmp_path):
    torch.manual_seed(0)
    spec = QuantSpec(calib_method="entropy", symmetric=backend == "tensorrt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(_Net().eval(), torch.zeros(1, 3, 8, 8), backend=backend,
                                   config=QuantConfig(activation=spec))
    x = torch.zeros(2, 3, 8, 8)
    # all-zero calibration data is refused (CalibrationDataError); a quantizer can still end with an empty range
    # (a branch that is always zero): give the input quantizer one after calibrating on real-valued data
    fxquant.calibrate(prepared, [torch.randn(2, 3, 8, 8)], progress=False)
    inp = next(q for n, q in prepared.named_modules() if isinstance(q, TensorQuantizer) and n.startswith("x"))
    inp._min.zero_()
    inp._max.zero_()
    assert inp.amax.item() == 0.0
    converted = fxquant.convert(prepared)
    out = converted(x)
    torch.manual_seed(0)
    with torch.no_grad():
        reference = _Net().eval()(x)  # the quantized zero input is exactly zero: only weights/ReLU are rounded
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxquant.export_onnx(converted, x, tmp_path / "zero.onnx")
    model = onnx.load(str(tmp_path / "zero.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits]
    assert scales and all((s > 0).all() and (abs(s) < float("inf")).all() for s in scales)
    return result


def test_all_zero_data_through_convert_and_export(tmp_path):
    result = _zero_calibrated_export("onnxruntime", tmp_path)
    # finite and close: the empty input range maps every input to the zero point in both runtimes
    assert not math.isnan(result.ort_sqnr_db) and result.ort_sqnr_db > 20


def test_all_zero_data_tensorrt_export_verifies_in_ort(tmp_path):
    result = _zero_calibrated_export("tensorrt", tmp_path)
    assert result.ort_sqnr_db > 30


def test_nan_batch_is_a_calibration_error():
    prepared = _prepared("percentile")
    bad = torch.randn(2, 3, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(fxquant.CalibrationError, match="calibration batch 1 contains NaN or Inf values"):
        fxquant.calibrate(prepared, [torch.randn(2, 3, 8, 8), bad], progress=False)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "max", "ema"])
def test_model_producing_nan_names_the_quantizer_for_every_method(method):
    prepared = _prepared(method)
    with torch.no_grad():
        prepared.conv1.bias[0] = float("nan")
    with pytest.raises(fxquant.CalibrationError) as info:
        fxquant.calibrate(prepared, _data(), progress=False)
    msg = str(info.value)
    assert "calibration produced a NaN or infinite range" in msg
    assert "quantizer `" in msg and "conv2" in msg  # the quantizer in front of conv2 saw the NaN


def test_histogram_calibrator_records_non_finite_values():
    cal = histogram(torch.tensor([1.0, 2.0]), torch.tensor([float("inf"), 0.0]))
    assert not cal.is_finite
    _, hi = cal.compute(QuantSpec(calib_method="entropy"))
    assert hi.item() == float("inf")
    assert cal.hist.sum().item() == 2  # the finite batch is kept


def test_calibrate_a_model_without_quantizers():
    with pytest.raises(fxquant.CalibrationError, match="this model has no fxquant quantizers"):
        fxquant.calibrate(nn.Linear(2, 2), [torch.zeros(1, 2)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(nn.Sequential(nn.ReLU()), torch.zeros(1, 2), backend="tensorrt")
    assert not any(isinstance(m, TensorQuantizer) for m in prepared.modules())
    # a prepared model is not told to call prepare(): the error names its ops and why none is quantized
    with pytest.raises(fxquant.CalibrationError, match=r"for the tensorrt backend none of its ops \(_0 \(relu\)\) "
                       r"needs one"):
        fxquant.calibrate(prepared, [torch.zeros(1, 2)], progress=False)


def test_calibrators_refuse_bad_use():
    with pytest.raises(ValueError, match=r"histogram calibration .* is per tensor"):
        HistogramCalibrator(0)
    for cal in (MaxCalibrator(None), EmaCalibrator(None), HistogramCalibrator(None)):
        with pytest.raises(RuntimeError, match="called before any data was collected"):
            cal.compute(QuantSpec())


def test_calibrate_keeps_user_disabled_quantizers_disabled():
    prepared = _prepared("max")
    name, q = next((n, m) for n, m in prepared.named_modules()
                   if isinstance(m, TensorQuantizer) and not n.endswith("weight_quantizer"))
    q.set_mode("disabled")
    fxquant.calibrate(prepared, _data(), progress=False)
    assert q.mode == "disabled" and not q.is_calibrated
    qmodel = fxquant.convert(prepared)
    assert isinstance(qmodel.get_submodule(name), torch.nn.Identity)
