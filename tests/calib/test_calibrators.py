"""Calibrators (max, ema, histogram: percentile / entropy / mse): ranges checked against hand-computed values."""

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
from fxquant.calib import CALIBRATORS, EmaCalibrator, HistogramCalibrator, MaxCalibrator, make_calibrator
from fxquant.calib.histogram import MAX_SAMPLES, NUM_BINS, SAMPLE_BLOCK, bin_counts, sample_blocks, subsample
from fxquant.errors import ConfigError


def _calibrated(spec: QuantSpec, *batches: torch.Tensor) -> TensorQuantizer:
    q = TensorQuantizer(spec)
    q.set_mode("calib")
    for b in batches:
        q(b)
    q.load_calib_amax()
    q.set_mode("quant")
    return q


def _hist(*batches: torch.Tensor) -> HistogramCalibrator:
    cal = HistogramCalibrator(None)
    for b in batches:
        cal.collect(b)
    return cal


# ---- max ---------------------------------------------------------------------------------------------------


def test_max_per_tensor_tracks_min_and_max_over_batches():
    cal = MaxCalibrator(None)
    cal.collect(torch.tensor([1.0, -3.0, 2.0]))
    cal.collect(torch.tensor([0.5, 2.5]))
    lo, hi = cal.compute()
    assert (lo.item(), hi.item(), cal.num_batches) == (-3.0, 2.5, 2)
    q = _calibrated(QuantSpec(), torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0.5, 2.5]))
    assert q.amax.item() == 3.0
    assert q.scale.item() == pytest.approx(3.0 / 127)
    # affine: the step spans [min, max] = [-3, 2.5] over 255 codes; zero maps to code round(3 / step) = 139
    q = _calibrated(QuantSpec(symmetric=False), torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0.5, 2.5]))
    assert q.scale.item() == pytest.approx(5.5 / 255)
    assert q.zero_point.item() == round(3.0 / (5.5 / 255)) == 139


def test_max_per_channel():
    batches = (torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([[-5.0, 0.0], [0.0, 1.0]]))
    cal = MaxCalibrator(0)
    for b in batches:
        cal.collect(b)
    lo, hi = cal.compute()
    assert lo.tolist() == [-5.0, 0.0] and hi.tolist() == [1.0, 4.0]
    q = _calibrated(QuantSpec(axis=0), *batches)
    assert q.amax.tolist() == [5.0, 4.0]
    torch.testing.assert_close(q.scale, torch.tensor([5.0, 4.0]) / 127)
    # along axis 1 of a 3-D tensor: channel c's range is over [:, c, :]
    x = torch.arange(24.0).reshape(2, 3, 4) - 12
    cal = MaxCalibrator(1)
    cal.collect(x)
    lo, hi = cal.compute()
    assert lo.tolist() == [-12.0, -8.0, -4.0] and hi.tolist() == [3.0, 7.0, 11.0]


# ---- ema ---------------------------------------------------------------------------------------------------


def test_ema_bias_corrected_per_tensor():
    # decay 0.5, batch maxima 2, 4, 8: m1 = 1, m2 = 0.5 + 2 = 2.5, m3 = 1.25 + 4 = 5.25; 5.25 / (1 - 0.5^3) = 6
    # batch minima -1 each: the bias-corrected average of a constant is that constant
    cal = EmaCalibrator(None, decay=0.5)
    for top in (2.0, 4.0, 8.0):
        cal.collect(torch.tensor([-1.0, 0.0, top]))
    lo, hi = cal.compute()
    assert hi.item() == pytest.approx(6.0, abs=1e-6)
    assert lo.item() == pytest.approx(-1.0, abs=1e-6)
    assert cal._max.item() == pytest.approx(5.25)  # the stored, un-corrected average
    q = _calibrated(QuantSpec(calib_method="ema", ema_decay=0.5),
                    *(torch.tensor([-1.0, 0.0, t]) for t in (2.0, 4.0, 8.0)))
    assert q.amax.item() == pytest.approx(6.0, abs=1e-6)


def test_ema_bias_corrected_per_channel():
    # decay 0.9, channel maxima [1, 10] then [3, 20]: m2 = 0.9 * 0.1 * [1, 10] + 0.1 * [3, 20] = [0.39, 2.9],
    # corrected by 1 - 0.81 = 0.19: [39 / 19, 290 / 19]
    q = _calibrated(QuantSpec(axis=0, calib_method="ema"),
                    torch.tensor([[0.0, 1.0], [0.0, 10.0]]), torch.tensor([[0.0, 3.0], [0.0, 20.0]]))
    torch.testing.assert_close(q.amax, torch.tensor([39 / 19, 290 / 19]))
    cal = EmaCalibrator(0)
    cal.collect(torch.ones(3, 2))
    with pytest.raises(ValueError, match="saw 4 channels after 3: the channel count must not change"):
        cal.collect(torch.ones(4, 2))


# ---- histogram: percentile -------------------------------------------------------------------------------


def test_percentile_of_integers_1_to_1000():
    x = torch.arange(1, 1001, dtype=torch.float32).repeat(3)
    cal = _hist(x)
    assert cal.exponent == 10  # 1000 < 2^10: bins of 2 * 1024 / 4096 = 0.5
    width = 2 * 1024 / NUM_BINS
    lo, hi = cal.compute(QuantSpec(calib_method="percentile", percentile=99))
    # 99% of |x| is <= 990: the range ends at the left edge of 990's bin [990, 990.5), the bin edge
    # pytorch_quantization returns (the first bin where the cdf reaches 99%)
    assert abs(hi.item() - 990) <= width and hi.item() == 990.0 and lo.item() == -990.0
    lo, hi = cal.compute(QuantSpec(calib_method="percentile", percentile=90))
    assert hi.item() == 900.0
    lo, hi = cal.compute(QuantSpec(calib_method="percentile", percentile=100))
    assert hi.item() == 1000.0  # capped at the exact maximum, not the bin edge
    # affine: each tail keeps 99%: [left edge of 10's bin, right edge of 990's bin]
    lo, hi = cal.compute(QuantSpec(calib_method="percentile", percentile=99, symmetric=False))
    assert (lo.item(), hi.item()) == (10.0, 990.5)


# ---- histogram: mse --------------------------------------------------------------------------------------


def test_mse_of_uniform_data_is_just_below_the_max():
    # uniform |x| on [0, 1], N values, 127 steps: error(a) ~ N (a / 127)^2 / 12 * a + N (1 - a)^3 / 3, minimal at
    # a = 1 / (1 + 1 / 254) = 0.99608
    torch.manual_seed(0)
    x = torch.rand(200_000) * 2 - 1
    q = _calibrated(QuantSpec(calib_method="mse"), x)
    assert q.amax.item() == pytest.approx(1 / (1 + 1 / 254), abs=0.002)
    assert q.amax.item() < x.abs().max().item()


def test_mse_clips_a_huge_outlier():
    # N = 1e6 values uniform in [-1, 1] plus two outliers at +-20. With amax a < 20 the error is the rounding
    # noise N (a / 127)^2 / 12 plus the clipped outliers 2 (20 - a)^2; the minimum is at
    # a* = 4 * 20 / (N / (6 * 127^2) + 4) = 5.58
    torch.manual_seed(0)
    n = 1_000_000
    x = torch.cat([torch.rand(n) * 2 - 1, torch.tensor([20.0, -20.0])])
    q = _calibrated(QuantSpec(calib_method="mse"), x)
    optimum = 4 * 20 / (n / (6 * 127**2) + 4)
    assert abs(q.amax.item() - optimum) / optimum < 0.05

    def error(a: float) -> float:
        return float(((fxquant.fake_tensor_quant(x, torch.tensor(a)) - x) ** 2).sum())

    brute = min(error(a) for a in torch.linspace(2.0, 12.0, 41).tolist())
    assert error(q.amax.item()) <= 1.01 * brute
    assert error(q.amax.item()) < 0.5 * error(20.0)  # far better than the max range


def test_affine_mse_shrinks_towards_the_bulk():
    # affine mse scales [min, max] by one factor, so outliers on both sides are clipped like the symmetric case
    torch.manual_seed(0)
    x = torch.cat([torch.rand(1_000_000) * 2 - 1, torch.tensor([20.0, -20.0])])
    lo, hi = _hist(x).compute(QuantSpec(calib_method="mse", symmetric=False))
    assert -10 < lo.item() < -1 and 1 < hi.item() < 10
    assert lo.item() == pytest.approx(-hi.item())
    lo, hi = _hist(torch.rand(200_000)).compute(QuantSpec(calib_method="mse", symmetric=False))
    assert lo.item() == 0.0 and hi.item() > 0.98  # uniform on [0, 1): keeps (almost) all of it


# ---- histogram: entropy ----------------------------------------------------------------------------------


def test_entropy_of_uniform_data_keeps_the_max():
    torch.manual_seed(0)
    x = torch.rand(200_000) * 2 - 1
    lo, hi = _hist(x).compute(QuantSpec(calib_method="entropy"))
    # the unclipped histogram quantizes without loss of information (KL 0): amax is the exact maximum
    assert hi.item() == x.abs().max().item() and lo.item() == -hi.item()


@pytest.mark.smoke
def test_entropy_clips_a_long_sparse_tail():
    torch.manual_seed(0)
    bulk = torch.randn(200_000)
    tail = torch.rand(50) * 90 + 10  # 0.025% of the values, spread over [10, 100]
    x = torch.cat([bulk, tail])
    cal = _hist(x)
    _, hi = cal.compute(QuantSpec(calib_method="entropy"))
    top = x.abs().max().item()
    assert top > 90
    assert bulk.abs().max().item() < hi.item() < 0.5 * top
    _, hi_max = cal.compute(QuantSpec(calib_method="entropy"), "max")
    assert hi_max.item() == top


# ---- histogram: range growth, order independence ---------------------------------------------------------


def test_range_growth_keeps_earlier_data_exactly():
    small = torch.tensor([-0.75, -0.5, 0.0, 0.25, 0.5, 0.999])
    big = 4 * torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0])  # 4x the range, peaking at exactly 2^2
    a = _hist(small)
    assert a.exponent == 0
    a.collect(big)
    assert a.exponent == 3  # 4.0 needs [-8, 8): every value lies strictly inside
    assert a.hist.sum().item() == 12  # total counts preserved
    b = _hist(big, small)
    assert b.exponent == 3
    assert torch.equal(a.hist, b.hist)  # the same histogram in either order
    assert torch.equal(a.hist, bin_counts(small, 3) + bin_counts(big, 3))  # as if binned at 2^3 from the start
    for method in ("max", "percentile", "entropy", "mse"):
        for symmetric in (True, False):
            spec = QuantSpec(calib_method="mse", symmetric=symmetric)
            ra, rb = a.compute(spec, method), b.compute(spec, method)
            assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1]), (method, symmetric)


def test_range_growth_is_order_independent_for_random_floats():
    # float32 values whose bin needs the exact power-of-two scaling: no value may land in a neighbour bin
    torch.manual_seed(0)
    x, y = torch.randn(200_000), 5 * torch.randn(200_000)
    a, b = _hist(x, y), _hist(y, x)
    assert torch.equal(a.hist, b.hist)
    assert a.hist.sum().item() == 400_000
    # merging two processes' histograms (widen to the common range, add) gives the same counts
    cx, cy = _hist(x), _hist(y)
    assert cx.exponent < cy.exponent
    cx.widen_to(cy.exponent)
    assert torch.equal(cx.hist + cy.hist, a.hist)


def test_large_tensors_are_binned_from_an_even_subsample_with_exact_extremes():
    # 8 x 64 x 56 x 56 = 1,605,632 elements: 4096 runs of 256 contiguous elements, starting every `step`
    # elements, step coprime with the element count (a step sharing a factor with the 56-wide rows would start
    # every run at the same few columns)
    numel = 8 * 64 * 56 * 56
    blocks, step = sample_blocks(numel)
    assert blocks * SAMPLE_BLOCK == MAX_SAMPLES and math.gcd(step, numel) == 1
    assert (blocks - 1) * step + SAMPLE_BLOCK <= numel  # the last run ends inside the tensor
    assert sample_blocks(MAX_SAMPLES) == (1, MAX_SAMPLES)
    for n in (numel, 3 * 5 * 7 * 2**16, 10**7, MAX_SAMPLES + 1):
        b, s = sample_blocks(n)
        assert math.gcd(s, n) == 1 and b * SAMPLE_BLOCK <= MAX_SAMPLES and (b - 1) * s + SAMPLE_BLOCK <= n
    torch.manual_seed(0)
    x = torch.randn(8, 64, 56, 56).relu()
    flat = x.flatten()
    sampled = torch.zeros(numel, dtype=torch.bool)
    for i in range(blocks):
        sampled[i * step:i * step + SAMPLE_BLOCK] = True
    assert torch.equal(subsample(x), flat[sampled])
    outside = int((~sampled).nonzero()[0])
    x.view(-1)[outside] = 9.5  # the extreme sits off the sample
    cal = _hist(x)
    assert cal.hist.sum().item() == MAX_SAMPLES  # the binned sample
    assert cal._max.item() == 9.5  # ... but min/max come from every element
    assert cal.exponent == 4  # and the range holds them
    # the runs start at every column evenly (the step is coprime with the width)
    cols = torch.arange(blocks) * step % 56
    assert torch.bincount(cols, minlength=56).float().std() / (blocks / 56) < 0.05
    # the subsampled ranges stay close to full binning: percentile within 2%, mse's error within 2% of full's
    # (over seeds 0-5 without the outlier, sampled / full error scatters up to 1.012 for an element-wise
    # stride and 1.005 for these runs)
    full = HistogramCalibrator(None)
    full.hist = torch.zeros(NUM_BINS, dtype=torch.float64)
    full.widen_to(cal.exponent)
    full.hist += bin_counts(x, cal.exponent)
    full._min, full._max, full.num_batches = cal._min, cal._max, 1
    every = make_calibrator(QuantSpec(calib_method="mse", hist_samples=None))  # the switch that bins every element
    every.collect(x)
    assert torch.equal(every.hist, full.hist) and every.exponent == cal.exponent
    with pytest.raises(ConfigError, match="hist_samples"):
        QuantSpec(hist_samples=100)

    def mse(amax: float) -> float:
        s = amax / 127
        return ((x - (x / s).round().clamp(-127, 127) * s) ** 2).mean().item()

    spec = QuantSpec(calib_method="percentile", percentile=99.99)
    assert cal.compute(spec)[1].item() == pytest.approx(full.compute(spec)[1].item(), rel=0.02)
    spec = QuantSpec(calib_method="mse")
    assert mse(cal.compute(spec)[1].item()) <= 1.02 * mse(full.compute(spec)[1].item())


# ---- re-deriving ranges without running data again -------------------------------------------------------


def test_tensor_quantizer_rederives_with_another_method():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000), torch.rand(50) * 90 + 10])
    q = _calibrated(QuantSpec(calib_method="percentile", percentile=99.9), x)
    pct = q.amax.item()
    for method in ("entropy", "mse"):
        q.load_calib_amax(method)
        assert q.amax.item() == _calibrated(QuantSpec(calib_method=method), x).amax.item(), method
        assert q.amax.item() != pct
    q.load_calib_amax("max")
    assert q.amax.item() == x.abs().max().item()
    q.load_calib_amax()  # back to the spec's own method
    assert q.amax.item() == pct < x.abs().max().item()
    with pytest.raises(ValueError, match=r"cannot derive a 'ema' range \(it can: \['max', 'percentile', 'entropy'"):
        q.load_calib_amax("ema")


def test_max_calibrator_cannot_give_mse():
    q = _calibrated(QuantSpec(), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError) as info:
        q.load_calib_amax("mse")
    msg = str(info.value)
    assert "a MaxCalibrator cannot derive a 'mse' range (it can: ['max'])" in msg
    assert "calibrate with calib_method='percentile', 'entropy' or 'mse'" in msg
    assert q.amax.item() == 2.0  # unchanged


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
    q = _calibrated(QuantSpec(calib_method="mse"), torch.tensor([1.0, -2.0]))
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
    q = _calibrated(spec, torch.zeros(5, 7), torch.zeros(3))
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
    cal = _hist(torch.tensor([1.0, 2.0]), torch.tensor([float("inf"), 0.0]))
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
