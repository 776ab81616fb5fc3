"""Distributed calibration: two gloo ranks on CPU (loopback) end with the ranges of one process on the union.

The ranks are two subprocesses running this file as a script (``python tests/calib/test_distributed.py RANK ...``);
each runs a list of scenarios and saves what it got to a file. A scenario that hangs cannot block the suite:
the process group has a short timeout and the parent kills the workers after ``_TIMEOUT_S``.
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.calib import HistogramCalibrator
from tests.gloo_workers import spawn

WORLD = 2
_TIMEOUT_S = 300
HIST_METHODS = ("percentile", "entropy", "mse")
BACKENDS = ("tensorrt", "onnxruntime")


# ---- model, data and scenarios (shared by the parent and the ranks) --------------------------------------


class _Net(nn.Module):
    """Conv-BN-ReLU-Conv-BN + residual add + ReLU; ``extra`` adds one more conv (a different graph)."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1) if extra else None

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y)) + y
        if self.conv3 is not None:
            z = self.conv3(z)
        return self.relu(z)


def _model(extra: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = _Net(extra)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    """8 batches; rank 1's shard (the last 4) is wider with heavy tails, so the ranks' histogram ranges differ.

    Batch 4 peaks at exactly 2.0, a power of two: rank 1 bins it in a narrower histogram than a single process
    that has already seen rank 0's shard, which only exact binning merges into the same counts.
    """
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(8):
        x = torch.randn(4, 3, 12, 12, generator=g)
        if i == 4:
            x = x.clamp(-2.0, 2.0)
            x[0, 0, 0, 0] = 2.0
        elif i > 4:
            x = x * 6 * torch.rand(4, 3, 12, 12, generator=g) ** 4
        out.append(x)
    return out


def _shard(rank: int) -> list[torch.Tensor]:
    return _batches()[4 * rank:4 * rank + 4]


def _config(backend: str, method: str, axis: int | None = None) -> QuantConfig:
    if backend == "onnxruntime":
        return QuantConfig(activation=QuantSpec(num_bits=8, symmetric=False, calib_method=method, axis=axis))
    return QuantConfig(activation=QuantSpec(calib_method=method, axis=axis))


def _example() -> torch.Tensor:
    return torch.zeros(1, 3, 12, 12)


def _prepare(backend: str, config: QuantConfig, extra: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(_model(extra), _example(), backend=backend, config=config)


def _quantizers(model) -> dict[str, fxquant.TensorQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, fxquant.TensorQuantizer)}


def _record(prepared) -> dict:
    out = {}
    for name, q in _quantizers(prepared).items():
        cal = q.calibrator
        out[name] = {"scale": q.scale.clone(), "zero_point": q.zero_point.clone(), "min": q._min.clone(),
                     "max": q._max.clone(), "num_batches": cal.num_batches}
        if isinstance(cal, HistogramCalibrator):
            out[name].update(hist=cal.hist.clone(), exponent=cal.exponent)
    return out


def _keys(prepared) -> list[tuple]:
    return [(n, q.spec.calib_method, q.spec.axis) for n, q in _quantizers(prepared).items()]


# scenario name -> per-rank (backend, calib method, activation axis, extra conv, has batches)
AGREE = {f"{b}-{m}": [(b, m, None, False, True)] * WORLD for b in BACKENDS for m in ("max", *HIST_METHODS, "ema")}
AGREE["tensorrt-max-per-channel"] = [("tensorrt", "max", 1, False, True)] * WORLD
AGREE["rank1-empty-tensorrt-max-per-channel"] = [("tensorrt", "max", 1, False, True),
                                                 ("tensorrt", "max", 1, False, False)]
AGREE["rank1-empty-onnxruntime-entropy"] = [("onnxruntime", "entropy", None, False, True),
                                            ("onnxruntime", "entropy", None, False, False)]
AGREE["all-empty"] = [("tensorrt", "max", None, False, False)] * WORLD
DISAGREE = {
    "backend": [("tensorrt", "max", None, False, True), ("onnxruntime", "max", None, False, True)],
    "model": [("tensorrt", "max", None, False, True), ("tensorrt", "max", None, True, True)],
    "calib_method": [("tensorrt", "max", None, False, True), ("tensorrt", "entropy", None, False, True)],
    "num_bits": [("tensorrt", "max", None, False, True), ("tensorrt", "max", None, False, True, 7)],
    # only rank 1's model emits NaN: both ranks report the same quantizer
    "nan-on-rank1": [("tensorrt", "entropy", None, False, True), ("tensorrt", "entropy", None, False, True, None,
                                                                  True)],
    # the process group still works after the errors above: a normal calibration afterwards
    "after": [("tensorrt", "entropy", None, False, True)] * WORLD,
}


def _run_scenario(rank: int, setups: list[tuple]) -> dict:
    backend, method, axis, extra, has_batches, *rest = setups[rank]
    bits, nan = (*rest, None, False)[:2]
    config = _config(backend, method, axis)
    if bits:
        config = QuantConfig(activation=config.activation.with_(num_bits=bits))
    prepared = _prepare(backend, config, extra)
    if nan:
        with torch.no_grad():
            prepared.conv1.bias[0] = float("nan")
    # a rank with data runs the whole union when the other rank has none
    batches = (_shard(rank) if all(s[4] for s in setups) else _batches()) if has_batches else []
    try:
        fxquant.calibrate(prepared, batches, progress=False)
    except fxquant.CalibrationError as exc:
        return {"error": str(exc), "keys": _keys(prepared)}
    return {"quantizers": _record(prepared), "keys": _keys(prepared)}


class _FFN(nn.Module):
    """Linear -> GELU -> Linear whose hidden channel 3 is massive: the outlier split would fire."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)
        with torch.no_grad():
            self.up.bias[3] = 30.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def _run_data_driven_pass(rank: int, setting: object) -> dict:
    """calibrate() with the outlier split asked for ("auto" or True) under distributed calibration."""
    torch.manual_seed(rank)
    batches = [torch.randn(2, 8, 16) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(_FFN().eval(), batches[0], backend="onnxruntime",
                                   config=QuantConfig(outlier_channels=setting))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fxquant.calibrate(prepared, batches, progress=False)
        except fxquant.FxQuantError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
    report = fxquant.report_of(prepared)
    return {"split": "outlier_channels" in report.ptq, "skipped": list(report.skipped),
            "warnings": [str(w.message) for w in caught], "calibrated": all(
                q.is_calibrated for q in prepared.modules() if isinstance(q, fxquant.TensorQuantizer))}


def _worker(rank: int, port: int, group_name: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=150))
    results = {}
    try:
        for name, setups in (AGREE if group_name == "agree" else DISAGREE).items():
            results[name] = _run_scenario(rank, setups)
        if group_name == "agree":
            results["split-auto"] = _run_data_driven_pass(rank, "auto")
            results["split-true"] = _run_data_driven_pass(rank, True)
    finally:
        torch.save(results, out)
        dist.destroy_process_group()


# ---- parent side -----------------------------------------------------------------------------------------


def _spawn(group_name: str, tmp: Path) -> list[dict]:
    outs = [tmp / f"{group_name}-rank{r}.pt" for r in range(WORLD)]
    return spawn(__file__, WORLD, lambda r, port, out: [str(r), str(port), group_name, str(out)], outs,
                 _TIMEOUT_S, f"distributed workers ({group_name})")


@pytest.fixture(scope="module")
def agree(tmp_path_factory):
    return _spawn("agree", tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def disagree(tmp_path_factory):
    return _spawn("disagree", tmp_path_factory.mktemp("dist"))


def _single(backend: str, method: str, batches: list[torch.Tensor], axis: int | None = None) -> dict:
    prepared = _prepare(backend, _config(backend, method, axis))
    fxquant.calibrate(prepared, batches, progress=False)
    return _record(prepared)


def _assert_ranks_identical(ranks: list[dict], scenario: str) -> dict:
    r0, r1 = (r[scenario]["quantizers"] for r in ranks)
    assert list(r0) == list(r1)
    for name in r0:
        for key in r0[name]:
            a, b = r0[name][key], r1[name][key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (scenario, name, key)
    return r0


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_equals_single_process_on_the_union_exactly(agree, backend):
    got = _assert_ranks_identical(agree, f"{backend}-max")
    want = _single(backend, "max", _batches())
    assert list(got) == list(want) and len(got) >= 3
    for name in want:
        assert torch.equal(got[name]["scale"], want[name]["scale"]), name
        assert torch.equal(got[name]["zero_point"], want[name]["zero_point"]), name
        # weights are looked at once per rank: they do not change between batches
        assert got[name]["num_batches"] == (WORLD if name.endswith("weight_quantizer") else 8), name
    # the shards really differ: rank 0 alone would get a smaller activation range
    alone = _single(backend, "max", _shard(0))
    act = next(n for n in want if not n.endswith("weight_quantizer"))
    assert alone[act]["scale"].item() < 0.5 * want[act]["scale"].item()


def test_per_channel_activation_max_equals_the_union(agree):
    got = _assert_ranks_identical(agree, "tensorrt-max-per-channel")
    want = _single("tensorrt", "max", _batches(), axis=1)
    per_channel = [n for n in want if not n.endswith("weight_quantizer")]
    assert per_channel and all(want[n]["scale"].shape == (8,) or want[n]["scale"].shape == (3,) for n in per_channel)
    for name in want:
        assert torch.equal(got[name]["scale"], want[name]["scale"]), name
        assert torch.equal(got[name]["min"], want[name]["min"]) and torch.equal(got[name]["max"], want[name]["max"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", HIST_METHODS)
def test_histogram_methods_equal_single_process_on_the_union(agree, backend, method):
    got = _assert_ranks_identical(agree, f"{backend}-{method}")
    want = _single(backend, method, _batches())
    hist_names = [n for n in want if "hist" in want[n]]
    assert hist_names
    # the ranks' ranges differed, so the merge had to widen rank 0's histogram
    alone = _single(backend, method, _shard(0))
    assert any(alone[n]["exponent"] < want[n]["exponent"] for n in hist_names)
    for name in want:
        ratio = got[name]["scale"] / want[name]["scale"]
        assert torch.all((ratio - 1).abs() <= 0.01), (name, ratio)  # the 1% bound ...
        assert torch.equal(got[name]["scale"], want[name]["scale"]), name  # ... and in fact exact
        assert torch.equal(got[name]["zero_point"], want[name]["zero_point"]), name
    for name in hist_names:
        assert got[name]["exponent"] == want[name]["exponent"]
        assert torch.equal(got[name]["hist"], want[name]["hist"]), name  # bit-for-bit the union's histogram
        assert got[name]["hist"].sum().item() == want[name]["hist"].sum().item() > 0
        assert torch.equal(got[name]["min"], want[name]["min"]) and torch.equal(got[name]["max"], want[name]["max"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_is_the_mean_of_the_ranks_bias_corrected_averages(agree, backend):
    got = _assert_ranks_identical(agree, f"{backend}-ema")
    shards = [_single(backend, "ema", _shard(r)) for r in range(WORLD)]
    union = _single(backend, "ema", _batches())
    act = [n for n in got if not n.endswith("weight_quantizer")]
    assert act
    for name in act:
        for key in ("min", "max"):
            mean = (shards[0][name][key] + shards[1][name][key]) / 2
            torch.testing.assert_close(got[name][key], mean, rtol=1e-6, atol=1e-7)
        assert got[name]["num_batches"] == 4  # the largest per-rank count
        # documented: order-dependent, so not the union's EMA (rank 1's wide batches come last there)
        assert not torch.allclose(got[name]["max"], union[name]["max"], rtol=1e-3)


def test_a_rank_with_no_batches_contributes_nothing(agree):
    got = _assert_ranks_identical(agree, "rank1-empty-tensorrt-max-per-channel")
    want = _single("tensorrt", "max", _batches(), axis=1)
    for name in want:
        assert torch.equal(got[name]["scale"], want[name]["scale"]), name
        assert got[name]["num_batches"] == (1 if name.endswith("weight_quantizer") else 8)  # rank 1 saw none
    got = _assert_ranks_identical(agree, "rank1-empty-onnxruntime-entropy")
    want = _single("onnxruntime", "entropy", _batches())
    for name in want:
        assert torch.equal(got[name]["scale"], want[name]["scale"]), name
        assert torch.equal(got[name]["zero_point"], want[name]["zero_point"]), name


def test_no_batches_on_any_rank_is_the_empty_iterable_error(agree):
    for r in range(WORLD):
        assert "the calibration iterable was empty; pass at least one batch" in agree[r]["all-empty"]["error"]


def _first_difference(a: list[tuple], b: list[tuple]) -> tuple | None:
    return next(((x, y) for x, y in zip(a, b, strict=False) if x != y), None)


def test_ranks_on_different_backends_raise_on_both_ranks(disagree):
    errors = [disagree[r]["backend"].get("error") for r in range(WORLD)]
    assert errors[0] is not None and errors[0] == errors[1]
    # in graph order the first difference is conv1's weight spec: 8-bit for tensorrt, 7-bit for onnxruntime
    assert errors[0].startswith("ranks disagree on the QuantSpec of quantizer `conv1.weight_quantizer`: "
                                "num_bits=8 on rank 0 but 7 on rank 1"), errors[0]


@pytest.mark.parametrize("scenario", ["model", "calib_method"])
def test_ranks_disagreeing_on_the_graph_raise_on_both_ranks(disagree, scenario):
    errors = [disagree[r][scenario].get("error") for r in range(WORLD)]
    assert errors[0] is not None and errors[0] == errors[1]
    msg = errors[0]
    assert "ranks disagree on the quantized graph" in msg
    assert "every rank must prepare the same model with the same backend and QuantConfig" in msg
    keys0, keys1 = (disagree[r][scenario]["keys"] for r in range(WORLD))
    first = _first_difference(keys0, keys1)
    if first is not None:
        first0, first1 = first
        assert f"rank 0 has `{first0[0]}` (calib_method={first0[1]!r}" in msg, msg
        assert f"rank 1 has `{first1[0]}` (calib_method={first1[1]!r}" in msg, msg
    else:
        longer = keys0 if len(keys0) > len(keys1) else keys1
        extra = longer[min(len(keys0), len(keys1))]
        assert f"rank 0 has {len(keys0)} quantizers, rank 1 has {len(keys1)}" in msg
        assert f"`{extra[0]}`" in msg


def test_ranks_disagreeing_on_a_spec_name_the_field(disagree):
    errors = [disagree[r]["num_bits"].get("error") for r in range(WORLD)]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "ranks disagree on the QuantSpec of quantizer `" in errors[0]
    assert "num_bits=8 on rank 0 but 7 on rank 1" in errors[0]


def test_nan_on_one_rank_is_reported_by_every_rank(disagree):
    errors = [disagree[r]["nan-on-rank1"].get("error") for r in range(WORLD)]
    assert errors[0] is not None and errors[0] == errors[1]
    assert errors[0].startswith("quantizer `relu_quantizer`: calibration produced a NaN or infinite range")


def test_the_group_keeps_working_after_a_disagreement(disagree):
    got = _assert_ranks_identical(disagree, "after")
    want = _single("tensorrt", "entropy", _batches())
    for name in want:
        assert torch.equal(got[name]["scale"], want[name]["scale"]), name


def test_data_driven_graph_passes_are_skipped_with_a_warning_under_distributed_calibration(agree):
    # each rank would pick its own outlier channels from its own batches: "auto" skips and says so in the report
    # on every rank (no warning: the split's trigger, any Linear, fits every CNN head)
    for rank in agree:
        auto = rank["split-auto"]
        assert auto["calibrated"] and not auto["split"]
        note = "outlier_channels skipped under distributed calibration"
        assert any(note in s for s in auto["skipped"]) and not any(note in w for w in auto["warnings"])
        assert "distributed=False" in next(s for s in auto["skipped"] if note in s)
        assert rank["split-true"]["error"].startswith("ConfigError: QuantConfig(outlier_channels=True) under "
                                                      "distributed calibration")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
