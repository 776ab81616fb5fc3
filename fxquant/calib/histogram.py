"""Histogram calibrator: one collected histogram serves every histogram method (percentile, entropy, mse).

The histogram is signed, on the tensor's device, over a symmetric range [-2^k, 2^k) that holds every value
strictly inside it. When a batch exceeds the range, k grows and the old counts merge exactly into the wider
bins (groups of 2^d bins sum into one), so earlier data is kept. A value's bin is ``floor(x * 2^(11 - k))``
(offset by NUM_BINS / 2), computed without rounding error, so binning at k and then merging to a wider k' gives the
very bin that binning at k' would: the histogram does not depend on the order of the batches, and histograms
from different processes merge exactly into the histogram of the union of their data.

The methods follow pytorch_quantization's HistogramCalibrator: percentile returns the left edge of the |x| bin where
the cdf reaches p; entropy tries every bin from bin 128 on (``ENTROPY_START_BIN``, ``ENTROPY_STRIDE``), skips
candidates with infinite KL and takes the last of equal minima. Differences by design: NVIDIA's bins are 2048 over
[0, max |x|] of the first batch (stretched later), ours 2048 per sign over [0, 2^k], so a range lands on another
grid (1.0 where NVIDIA gets 1.00098 on its outlier test); entropy flattens the zero bin only when bin 1 is not
empty; mse searches a grid of ranges (``MSE_CANDIDATES``) instead of every bin center; affine specs (which NVIDIA
does not have) take each tail's percentile on the signed histogram and start the entropy search at 2^b bins.

Cost: a tensor of more than ``QuantSpec.hist_samples`` elements (2^18 by default) is read through a fixed
subsample, runs of ``SAMPLE_BLOCK`` contiguous elements spread evenly over it (``subsample``: deterministic, the same
elements every run): its bins, min and max all come from those elements, so the calibrator reads only the sampled
memory (a full pass over every activation would cost about 5 % of a CNN's forward). Measured on pretrained
EfficientNet-Lite0 and MobileNetV2 (``benchmarks/hist_subsample.py``, docs/ptq.md) the ranges and accuracy match
reading every element within the figures there; ``hist_samples=None`` reads every element (exact extremes, and a
NaN anywhere in the tensor is seen). The searches (percentile, entropy, mse) run
over all candidate bins at once (tensor ops, entropy in cache-sized chunks of candidates).
"""

from __future__ import annotations

import math

import torch

from fxquant.calib.base import Calibrator, Stats, has_stats, merged_minmax, minmax_parts, numel
from fxquant.errors import CalibrationError, ConfigError
from fxquant.spec import QuantSpec

NUM_BINS = 4096  # signed: 2048 bins for each sign
_HALF_BITS = (NUM_BINS // 2).bit_length() - 1  # 2^11 bins per sign
_MIN_EXP = -24
MSE_CANDIDATES = 128  # ranges tried by the mse search, evenly spaced up to the observed maximum
MAX_SAMPLES = QuantSpec.hist_samples  # elements binned per tensor and batch; larger tensors are subsampled
SAMPLE_BLOCK = 256  # contiguous elements per run of the subsample
ENTROPY_START_BIN = 128  # the entropy search's first candidate (|x| bins), as pytorch_quantization documents
ENTROPY_STRIDE = 1  # the entropy search tries every bin from the start bin on, as pytorch_quantization does
ENTROPY_CHUNK = 256  # candidates evaluated together by the entropy search


def _rebin(hist: torch.Tensor, factor: int) -> torch.Tensor:
    """The same counts over a range ``factor`` (a power of two) times wider."""
    n = hist.numel()
    out = torch.zeros_like(hist)
    if factor >= n // 2:
        out[n // 2 - 1] = hist[: n // 2].sum()
        out[n // 2] = hist[n // 2:].sum()
        return out
    groups = hist.view(n // factor, factor).sum(1)
    start = (n - n // factor) // 2
    out[start:start + n // factor] = groups
    return out


def exponent_for(amax: float) -> int:
    """The smallest k (at least the minimum exponent) with amax < 2^k; exact (frexp, no log2 rounding)."""
    if amax <= 0:
        return _MIN_EXP
    return max(_MIN_EXP, math.frexp(amax)[1])  # amax = m * 2^e with 0.5 <= m < 1, so 2^(e-1) <= amax < 2^e


def sample_blocks(numel: int, max_samples: int = MAX_SAMPLES, block: int = SAMPLE_BLOCK) -> tuple[int, int]:
    """(blocks, step): the subsample of a tensor of ``numel`` elements is ``blocks`` runs of ``block`` contiguous
    elements starting every ``step`` elements, with ``step`` coprime with ``numel`` (so the runs start at every
    row, column and channel position evenly) and at most ``max_samples`` elements in all; (1, numel) when the
    whole tensor fits."""
    if numel <= max_samples:
        return 1, numel
    blocks = max(max_samples // block, 2)
    step = (numel - block) // (blocks - 1)  # the last run ends inside the tensor
    while math.gcd(step, numel) != 1:
        step -= 1
    return blocks, step


def subsample(x: torch.Tensor, max_samples: int = MAX_SAMPLES, block: int = SAMPLE_BLOCK) -> torch.Tensor:
    """The elements of ``x`` that ``sample_blocks`` picks, as a (blocks, block) view of its memory, one run per
    row (``x`` itself, flattened, when it fits): no copy. Runs of contiguous elements read only the sampled
    memory; an element-wise stride would read every cache line of the tensor."""
    flat = x.detach().reshape(-1)
    blocks, step = sample_blocks(flat.numel(), max_samples, block)
    if blocks == 1:
        return flat
    return flat.as_strided((blocks, block), (step, 1), flat.storage_offset())


def bin_counts(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """Counts of ``x`` (all |x| < 2^exponent, any shape or strides) in NUM_BINS bins over
    [-2^exponent, 2^exponent), as float64.

    The bin is ``floor(x * 2^(11 - exponent))`` with no rounding error: scaling by a power of two is exact in
    float32 when the factor is >= 1 (no underflow, and |x * factor| < 2^11); a smaller factor could flush tiny
    negative values to -0.0 in float32, so that (rare: |x| >= 2048) case scales in float64. The scaling reads a
    strided ``x`` (a subsample) into one new contiguous tensor, the only copy.
    """
    scale = 2.0 ** (_HALF_BITS - exponent)
    scaled = x.detach().float() * scale if scale >= 1 else x.detach().double() * scale
    # |x| < 2^exponent puts floor(scaled) in [-2^11, 2^11): the index is in range without a clamp
    index = scaled.floor_().to(torch.int32).add_(NUM_BINS // 2)
    return torch.bincount(index.view(-1), minlength=NUM_BINS).double()


class HistogramCalibrator(Calibrator):
    """Collects a histogram and the exact min/max of one tensor (per tensor only)."""

    methods = ("max", "percentile", "entropy", "mse")
    mergeable = True  # histograms widened to the largest range of any rank and summed, exact minima/maxima

    def __init__(self, axis: int | None, max_samples: int | None = MAX_SAMPLES) -> None:
        if axis is not None:
            raise ConfigError("histogram calibration (percentile/entropy/mse) is per tensor; use calib_method='max' "
                              "or 'ema' for per-channel quantizers")
        super().__init__(axis)
        self.max_samples = max_samples  # None: bin every element (``QuantSpec.hist_samples``)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.hist: torch.Tensor | None = None
        self.exponent = _MIN_EXP
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    @property
    def bound(self) -> float:
        return 2.0 ** self.exponent

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.max_samples is not None:
            x = subsample(x, self.max_samples)  # a view: min, max and bins all read the same elements
        lo, hi = torch.aminmax(x)
        if self.hist is None:
            self.hist = torch.zeros(NUM_BINS, dtype=torch.float64, device=x.device)
            self._min, self._max = lo, hi
        else:
            self._min, self._max = torch.minimum(self._min, lo), torch.maximum(self._max, hi)
        self.num_batches += 1
        lo_f, hi_f = lo.item(), hi.item()  # one sync per batch: the range must be known on the host
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
            # keep the NaN/Inf in min/max: compute() then returns it and load_calib_amax reports it
            # (a CalibrationError naming the quantizer), as it does for the other calibrators
            return
        self.widen_to(exponent_for(max(-lo_f, hi_f)))
        self.hist += bin_counts(x, self.exponent)

    @property
    def is_finite(self) -> bool:
        """False once a collected tensor held NaN or Inf."""
        return self._min is None or bool(torch.isfinite(self._min) & torch.isfinite(self._max))

    def minmax(self) -> Stats | None:
        return None if self._min is None else (self._min, self._max)

    def merge_meta(self) -> object:
        return self.exponent

    def merge_sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return 2 * numel(shape), NUM_BINS

    def merge_parts(self, shape: tuple[int, ...], metas: list[object]) -> tuple[list[torch.Tensor],
                                                                               list[torch.Tensor]]:
        self.widen_to(max(e for e in metas if e is not None))  # every rank's bins: the widest range of any
        hist = self.hist if has_stats(self) else None
        return minmax_parts(self, shape), [hist if hist is not None else torch.zeros(NUM_BINS, dtype=torch.float64)]

    def merge(self, mins: torch.Tensor, sums: torch.Tensor, shape: tuple[int, ...], counts: list[int],
              finite: bool, device: torch.device) -> None:
        self._min, self._max = merged_minmax(mins, shape, device, finite)
        self.hist = sums[:NUM_BINS].to(device)
        self.num_batches = sum(counts)

    def widen_to(self, exponent: int) -> None:
        """Rebin to the range [-2^exponent, 2^exponent) (a smaller exponent than the current one is a no-op)."""
        if self.hist is not None and exponent > self.exponent:
            self.hist = _rebin(self.hist, 2 ** (exponent - self.exponent))
        self.exponent = max(self.exponent, exponent)

    # ---- methods ------------------------------------------------------------------------------------
    def compute(self, spec, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hist is None:
            raise CalibrationError(f"{type(self).__name__}.compute() called before any data was collected: run "
                                   "the model on calibration batches in 'calib' mode (fxquant.calibrate) first")
        method = method or spec.calib_method
        if method == "max" or not self.is_finite:
            return self._min, self._max
        if method == "percentile":
            return self._percentile(spec)
        if method == "mse" and not spec.symmetric:
            return self._affine_mse(spec)
        if method == "mse":
            threshold = self._symmetric_mse(spec)
        else:
            folded = self._folded()
            if folded[1] > 0:  # flatten the spike of exact zeros (ReLU outputs), as NVIDIA's calibrator does;
                folded = folded.clone()  # skipped for sparse histograms, where it would leave a lone spike
                folded[0] = folded[1]
            # affine specs (no pytorch_quantization counterpart) keep their first candidate at 2^b bins: from
            # 128 bins the KL search takes a sparse histogram's lowest spike alone (KL 0) and clips the rest
            start = ENTROPY_START_BIN if spec.symmetric else max(ENTROPY_START_BIN, spec.qmax + 1)
            threshold = _entropy_amax(folded, self._width, spec.qmax + 1, start_bin=start)
        amax = torch.clamp(torch.maximum(-self._min, self._max), max=threshold)
        if spec.symmetric:
            return -amax, amax
        return torch.maximum(-amax, self._min), torch.minimum(amax, self._max)

    @property
    def _width(self) -> float:
        return 2 * self.bound / NUM_BINS

    def _folded(self) -> torch.Tensor:
        """Histogram of |x| over [0, 2^k] (NUM_BINS // 2 bins)."""
        half = NUM_BINS // 2
        return self.hist[half:] + self.hist[:half].flip(0)

    def _percentile(self, spec) -> tuple[torch.Tensor, torch.Tensor]:
        p = spec.percentile / 100.0
        if spec.symmetric:
            folded = self._folded()
            cdf = folded.cumsum(0) / folded.sum()
            idx = int(torch.searchsorted(cdf, torch.tensor([p], dtype=cdf.dtype, device=cdf.device)).clamp(
                max=folded.numel() - 1))
            # the left edge of the bin where the cdf reaches p, as pytorch_quantization returns it
            amax = torch.minimum(torch.tensor(idx * self._width, device=self._max.device),
                                 torch.maximum(-self._min, self._max))
            return -amax, amax
        cdf = self.hist.cumsum(0) / self.hist.sum()
        tail = (100.0 - spec.percentile) / 100.0  # not 1 - p: 1 - 0.99 is 0.010000000000000009, one bin too far
        edges = torch.searchsorted(cdf, torch.tensor([tail, p], dtype=cdf.dtype, device=cdf.device))
        edges = edges.clamp(max=NUM_BINS - 1)
        lo = -self.bound + edges[0].item() * self._width
        hi = -self.bound + (edges[1].item() + 1) * self._width
        return (torch.maximum(torch.tensor(lo, device=self._min.device), self._min),
                torch.minimum(torch.tensor(hi, device=self._max.device), self._max))

    def _symmetric_mse(self, spec) -> float:
        """The amax minimising the expected squared quantization error over the |x| histogram."""
        counts = self._folded()
        centers = (torch.arange(counts.numel(), device=counts.device, dtype=torch.float64) + 0.5) * self._width
        centers, counts = centers[counts > 0], counts[counts > 0]  # empty bins add no error
        levels = spec.qmax

        def error(candidates: torch.Tensor) -> torch.Tensor:
            step = candidates[:, None] / levels
            # qmath.fake_quantize(centers, step, 0, 0, levels) in place (centers > 0: only the top clamps)
            q = torch.div(centers[None, :], step).round_().clamp_(max=levels).mul_(step)
            return q.sub_(centers[None, :]).square_() @ counts  # in place + matmul: ~10x faster than **2 and sum

        top = float(torch.maximum(-self._min, self._max))
        return _minimize(error, top / 128, top, counts.device)

    def _affine_mse(self, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink [min, max] by the factor minimising the expected squared error over the signed histogram."""
        lo, hi = float(torch.clamp(self._min, max=0)), float(torch.clamp(self._max, min=0))
        centers = -self.bound + (torch.arange(NUM_BINS, device=self.hist.device, dtype=torch.float64) + 0.5) * \
            self._width
        used = self.hist > 0  # empty bins add no error
        centers, counts = centers[used], self.hist[used]

        def error(alphas: torch.Tensor) -> torch.Tensor:
            scale = torch.clamp(alphas * (hi - lo) / spec.qmax, min=1e-12)[:, None]
            zp = torch.clamp(torch.round(-alphas[:, None] * lo / scale), 0, spec.qmax)
            # qmath.fake_quantize(centers, scale, zp, 0, qmax) in place
            q = torch.div(centers[None, :], scale).round_().add_(zp).clamp_(0, spec.qmax).sub_(zp).mul_(scale)
            return q.sub_(centers[None, :]).square_() @ counts

        a = _minimize(error, 1 / 128, 1.0, counts.device)
        return (torch.tensor(a * lo, device=self._min.device), torch.tensor(a * hi, device=self._max.device))


def _minimize(error, lo: float, hi: float, device: torch.device) -> float:
    """Grid search of ``error`` (vectorized over candidates) on [lo, hi], then a finer grid around the best."""
    grid = torch.linspace(lo, hi, MSE_CANDIDATES, device=device, dtype=torch.float64)
    best = int(error(grid).argmin())
    fine = torch.linspace(float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)]), MSE_CANDIDATES // 2,
                          device=device, dtype=torch.float64)
    return float(fine[int(error(fine).argmin())])


def _entropy_amax(hist: torch.Tensor, width: float, levels: int, stride: int = ENTROPY_STRIDE,
                  start_bin: int = ENTROPY_START_BIN) -> float:
    """TensorRT's entropy calibration: the clipping threshold whose ``levels``-level quantization of the |x|
    histogram has the smallest KL divergence from the clipped histogram (the last of equal minima, as
    pytorch_quantization picks it).

    For each candidate i (every ``stride`` bins from ``start_bin`` to the last non-empty bin): P is hist[:i]
    with the clipped tail added to bin i-1; Q spreads each of ``levels`` groups of hist[:i] (bins j with
    floor(j * levels / i) = g) evenly over the group's non-empty bins (a candidate whose empty bin i-1 would hold
    the tail has infinite KL and is skipped, as in pytorch_quantization). Within a group Q is
    constant, so with T = sum(P), H = sum(Q) and per-group sums P_g, S_g and non-empty counts U_g,

        KL(P/T || Q/H) = (sum_j P_j log P_j) / T - log T + log H - (sum_g P_g log(S_g / U_g)) / T,

    and every sum is a difference of prefix sums: O(levels) work per candidate, not O(bins).
    """
    nonzero = torch.nonzero(hist).flatten()
    if nonzero.numel() == 0:
        return 0.0
    last = int(nonzero[-1]) + 1
    if last <= start_bin:
        return last * width
    dev, dt = hist.device, hist.dtype
    cand = torch.arange(start_bin, last + 1, stride, device=dev)
    if int(cand[-1]) != last:
        cand = torch.cat([cand, torch.tensor([last], device=dev)])
    h = hist[:last]
    pad = torch.zeros(1, dtype=dt, device=dev)
    counts = torch.cat([pad, h.cumsum(0)])                       # counts[k] = sum(h[:k])
    nonempty = torch.cat([pad, (h > 0).to(dt).cumsum(0)])
    hlogh = torch.cat([pad, torch.xlogy(h, h).cumsum(0)])
    total = hist.sum()
    tail = total - counts[cand]                                  # mass beyond each candidate's range
    p_last = h[cand - 1] + tail                                  # P's last bin holds the clipped tail
    groups = torch.arange(levels + 1, device=dev, dtype=torch.int32)
    g_last = torch.div((cand - 1) * levels, cand, rounding_mode="floor")  # bin i-1's group (not the last one
    grouped = torch.empty(cand.numel(), dtype=dt, device=dev)             # when levels > i)
    for start in range(0, cand.numel(), ENTROPY_CHUNK):  # chunks of candidates: the [C, levels] terms stay in cache
        part = slice(start, start + ENTROPY_CHUNK)
        grouped[part] = _grouped_plogq(counts, nonempty, cand[part].int(), groups, levels, g_last[part], tail[part])
    plogp = hlogh[cand - 1] + torch.xlogy(p_last, p_last)
    kl = plogp / total - torch.log(total) + torch.log(counts[cand]) - grouped / total
    # Q is 0 where hist is empty: a candidate whose empty last bin would hold the tail (KL infinite, as
    # pytorch_quantization finds), or that lies below every value, is never chosen
    kl = torch.where((counts[cand] > 0) & ((h[cand - 1] > 0) | (tail == 0)), kl, torch.inf)
    return int(cand[len(kl) - 1 - int(kl.flip(0).argmin())]) * width


def _grouped_plogq(counts: torch.Tensor, nonempty: torch.Tensor, cand: torch.Tensor, groups: torch.Tensor,
                   levels: int, g_last: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """sum_g P_g log(S_g / U_g) per candidate (see ``_entropy_amax``), with one gather per prefix sum and the
    [candidates, levels] terms computed in place."""
    bounds = groups[None, :] * cand[:, None] + levels - 1  # [C, levels + 1], int32
    if levels & (levels - 1) == 0:  # a power of two (every qmax + 1 is): a shift, not an integer division
        bounds.bitwise_right_shift_(levels.bit_length() - 1)
    else:
        bounds = torch.div(bounds, levels, rounding_mode="floor")
    at = counts[bounds]
    s = at[:, 1:] - at[:, :-1]                                   # S_g: the group's counts in hist[:i]
    at = nonempty[bounds]
    q = torch.div(s, (at[:, 1:] - at[:, :-1]).clamp_(min=1)).clamp_(min=1e-300)  # U_g: its non-empty bins
    s[torch.arange(cand.numel(), device=cand.device), g_last] += tail  # P: the clipped tail in bin i-1's group
    return q.log_().mul_(s).sum(1)  # xlogy(P, Q): Q >= 1e-300 keeps log(Q) finite, so P = 0 gives 0
