"""Calibrators (max, ema, histogram: percentile / entropy / mse): ranges checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import fxquant
from fxquant import QuantSpec
from fxquant.calib import EmaCalibrator, HistogramCalibrator, MaxCalibrator, make_calibrator
from fxquant.calib.histogram import (
    MAX_SAMPLES,
    NUM_BINS,
    SAMPLE_BLOCK,
    bin_counts,
    exponent_for,
    sample_blocks,
    subsample,
)
from fxquant.errors import ConfigError
from tests.calib.calibrated import calibrated, histogram

# ---- max ---------------------------------------------------------------------------------------------------


def test_max_per_tensor_tracks_min_and_max_over_batches():
    cal = MaxCalibrator(None)
    cal.collect(torch.tensor([1.0, -3.0, 2.0]))
    cal.collect(torch.tensor([0.5, 2.5]))
    lo, hi = cal.compute()
    assert (lo.item(), hi.item(), cal.num_batches) == (-3.0, 2.5, 2)
    q = calibrated(QuantSpec(), torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0.5, 2.5]))
    assert q.amax.item() == 3.0
    assert q.scale.item() == pytest.approx(3.0 / 127)
    # affine: the step spans [min, max] = [-3, 2.5] over 255 codes; zero maps to code round(3 / step) = 139
    q = calibrated(QuantSpec(symmetric=False), torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0.5, 2.5]))
    assert q.scale.item() == pytest.approx(5.5 / 255)
    assert q.zero_point.item() == round(3.0 / (5.5 / 255)) == 139


def test_max_per_channel():
    batches = (torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([[-5.0, 0.0], [0.0, 1.0]]))
    cal = MaxCalibrator(0)
    for b in batches:
        cal.collect(b)
    lo, hi = cal.compute()
    assert lo.tolist() == [-5.0, 0.0] and hi.tolist() == [1.0, 4.0]
    q = calibrated(QuantSpec(axis=0), *batches)
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
    q = calibrated(QuantSpec(calib_method="ema", ema_decay=0.5),
                    *(torch.tensor([-1.0, 0.0, t]) for t in (2.0, 4.0, 8.0)))
    assert q.amax.item() == pytest.approx(6.0, abs=1e-6)


def test_ema_bias_corrected_per_channel():
    # decay 0.9, channel maxima [1, 10] then [3, 20]: m2 = 0.9 * 0.1 * [1, 10] + 0.1 * [3, 20] = [0.39, 2.9],
    # corrected by 1 - 0.81 = 0.19: [39 / 19, 290 / 19]
    q = calibrated(QuantSpec(axis=0, calib_method="ema"),
                    torch.tensor([[0.0, 1.0], [0.0, 10.0]]), torch.tensor([[0.0, 3.0], [0.0, 20.0]]))
    torch.testing.assert_close(q.amax, torch.tensor([39 / 19, 290 / 19]))
    cal = EmaCalibrator(0)
    cal.collect(torch.ones(3, 2))
    with pytest.raises(ValueError, match="saw 4 channels after 3: the channel count must not change"):
        cal.collect(torch.ones(4, 2))


# ---- histogram: percentile -------------------------------------------------------------------------------


def test_percentile_of_integers_1_to_1000():
    x = torch.arange(1, 1001, dtype=torch.float32).repeat(3)
    cal = histogram(x)
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
    q = calibrated(QuantSpec(calib_method="mse"), x)
    assert q.amax.item() == pytest.approx(1 / (1 + 1 / 254), abs=0.002)
    assert q.amax.item() < x.abs().max().item()


def test_mse_clips_a_huge_outlier():
    # N = 1e6 values uniform in [-1, 1] plus two outliers at +-20. With amax a < 20 the error is the rounding
    # noise N (a / 127)^2 / 12 plus the clipped outliers 2 (20 - a)^2; the minimum is at
    # a* = 4 * 20 / (N / (6 * 127^2) + 4) = 5.58
    torch.manual_seed(0)
    n = 1_000_000
    x = torch.cat([torch.rand(n) * 2 - 1, torch.tensor([20.0, -20.0])])
    q = calibrated(QuantSpec(calib_method="mse", hist_samples=None), x)  # every element: both outliers binned
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
    lo, hi = histogram(x, max_samples=None).compute(QuantSpec(calib_method="mse", symmetric=False))
    assert -10 < lo.item() < -1 and 1 < hi.item() < 10
    assert lo.item() == pytest.approx(-hi.item())
    lo, hi = histogram(torch.rand(200_000)).compute(QuantSpec(calib_method="mse", symmetric=False))
    assert lo.item() == 0.0 and hi.item() > 0.98  # uniform on [0, 1): keeps (almost) all of it


# ---- histogram: entropy ----------------------------------------------------------------------------------


def test_entropy_of_uniform_data_keeps_the_max():
    torch.manual_seed(0)
    x = torch.rand(200_000) * 2 - 1
    lo, hi = histogram(x).compute(QuantSpec(calib_method="entropy"))
    # the unclipped histogram quantizes without loss of information (KL 0): amax is the exact maximum
    assert hi.item() == x.abs().max().item() and lo.item() == -hi.item()


@pytest.mark.smoke
def test_entropy_clips_a_long_sparse_tail():
    torch.manual_seed(0)
    bulk = torch.randn(200_000)
    tail = torch.rand(50) * 90 + 10  # 0.025% of the values, spread over [10, 100]
    x = torch.cat([bulk, tail])
    cal = histogram(x)
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
    a = histogram(small)
    assert a.exponent == 0
    a.collect(big)
    assert a.exponent == 3  # 4.0 needs [-8, 8): every value lies strictly inside
    assert a.hist.sum().item() == 12  # total counts preserved
    b = histogram(big, small)
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
    a, b = histogram(x, y), histogram(y, x)
    assert torch.equal(a.hist, b.hist)
    assert a.hist.sum().item() == 400_000
    # merging two processes' histograms (widen to the common range, add) gives the same counts
    cx, cy = histogram(x), histogram(y)
    assert cx.exponent < cy.exponent
    cx.widen_to(cy.exponent)
    assert torch.equal(cx.hist + cy.hist, a.hist)


def test_large_tensors_are_binned_from_an_even_subsample():
    # 8 x 64 x 56 x 56 = 1,605,632 elements: 1024 runs of 256 contiguous elements, starting every `step`
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
    assert torch.equal(subsample(x).reshape(-1), flat[sampled])
    outside = int((~sampled).nonzero()[0])
    kept = float(x.view(-1)[outside])
    x.view(-1)[outside] = 9.5  # an extreme off the sample
    cal = histogram(x)
    assert cal.hist.sum().item() == MAX_SAMPLES  # the binned sample
    assert cal._max.item() == subsample(x).max().item() < 9.5  # min, max and bins all read the sampled elements
    assert cal.exponent == exponent_for(cal._max.item()) == 3
    every = make_calibrator(QuantSpec(calib_method="mse", hist_samples=None))  # the switch that bins every element
    every.collect(x)
    assert every._max.item() == 9.5 and every.exponent == 4 and every.hist.sum().item() == numel
    x.view(-1)[outside] = kept
    cal = histogram(x)
    full = HistogramCalibrator(None, max_samples=None)
    full.collect(x)
    manual = torch.zeros(NUM_BINS, dtype=torch.float64)
    manual += bin_counts(x, full.exponent)
    assert torch.equal(full.hist, manual)
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
    q = calibrated(QuantSpec(calib_method="percentile", percentile=99.9), x)
    pct = q.amax.item()
    for method in ("entropy", "mse"):
        q.load_calib_amax(method)
        assert q.amax.item() == calibrated(QuantSpec(calib_method=method), x).amax.item(), method
        assert q.amax.item() != pct
    q.load_calib_amax("max")
    assert q.amax.item() == x.abs().max().item()
    q.load_calib_amax()  # back to the spec's own method
    assert q.amax.item() == pct < x.abs().max().item()
    with pytest.raises(ValueError, match=r"cannot derive a 'ema' range \(it can: \['max', 'percentile', 'entropy'"):
        q.load_calib_amax("ema")


def test_max_calibrator_cannot_give_mse():
    q = calibrated(QuantSpec(), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError) as info:
        q.load_calib_amax("mse")
    msg = str(info.value)
    assert "a MaxCalibrator cannot derive a 'mse' range (it can: ['max'])" in msg
    assert "calibrate with calib_method='percentile', 'entropy' or 'mse'" in msg
    assert q.amax.item() == 2.0  # unchanged


# ---- histogram: the vectorized searches against straightforward per-candidate loops ------------------------


def _reference_entropy_bin(hist: torch.Tensor, levels: int, start: int) -> int | None:
    """The KL search one candidate at a time, each P and Q built over its bins (float64, no prefix sums)."""
    last = int(torch.nonzero(hist).flatten()[-1]) + 1
    best, best_i = math.inf, None
    for i in range(start, last + 1):
        h = hist[:i]
        p = h.clone()
        p[-1] += hist[i:].sum()
        group = torch.arange(i) * levels // i  # bin j's group: floor(j * levels / i)
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, h)
        used = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, (h > 0).double())
        q = torch.where(h > 0, sums[group] / used[group].clamp(min=1), 0.0)  # spread over the non-empty bins
        if q.sum() == 0 or bool(((p > 0) & (q == 0)).any()):
            continue
        p, q = p / p.sum(), q / q.sum()
        kl = float((p[p > 0] * (p[p > 0] / q[p > 0]).log()).sum())
        if kl <= best:
            best, best_i = kl, i
    return best_i


def _test_histograms() -> list[torch.Tensor]:
    """|x| histograms (2048 bins) of random and heavy-tailed data, as the calibrator folds them."""
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(50_000, generator=g), torch.rand(30_000, generator=g) * 3,
            torch.distributions.StudentT(2.0).sample((40_000,)),  # heavy tails
            torch.cat([torch.randn(20_000, generator=g).abs() * 0.1, torch.tensor([9.0, 5.5, 7.25])])]
    return [histogram(x)._folded() for x in data]


@pytest.mark.parametrize("levels", [128, 256])
def test_entropy_search_picks_the_bin_a_per_candidate_loop_picks(levels: int) -> None:
    from fxquant.calib.histogram import _entropy_amax

    for hist in _test_histograms():
        want = _reference_entropy_bin(hist, levels, 128)
        assert want is not None
        assert _entropy_amax(hist, 1.0, levels) == float(want)


def _mse_error(hist: torch.Tensor, width: float, amax: float) -> float:
    """The squared error of the bin centers of ``hist`` quantized symmetric 8-bit with ``amax``, one candidate."""
    centers = (torch.arange(hist.numel(), dtype=torch.float64) + 0.5) * width
    step = amax / 127
    q = torch.clamp(torch.round(centers / step), max=127) * step
    return float((((q - centers) ** 2) * hist).sum())


def test_mse_search_matches_a_per_candidate_loop() -> None:
    for hist in _test_histograms():
        cal = histogram(torch.tensor([1.0]))
        cal.hist = torch.cat([torch.zeros_like(hist), hist])  # the folded counts as non-negative data
        top = float(torch.nonzero(hist).flatten()[-1] + 1) * cal._width
        cal._min, cal._max = torch.tensor(0.0), torch.tensor(top)
        grid = torch.linspace(top / 128, top, 128, dtype=torch.float64).tolist()
        best = min(range(len(grid)), key=lambda k: _mse_error(hist, cal._width, grid[k]))
        fine = torch.linspace(grid[max(best - 1, 0)], grid[min(best + 1, 127)], 64, dtype=torch.float64).tolist()
        want = min(fine, key=lambda a: _mse_error(hist, cal._width, a))
        got = cal._symmetric_mse(QuantSpec(calib_method="mse"))
        assert _mse_error(hist, cal._width, got) <= _mse_error(hist, cal._width, want) * (1 + 1e-9)
        assert got == pytest.approx(want, rel=1e-6)
