"""Outlier input channels of a Linear in float beside the int8 Linear: exact in float, placed, exported, and
worth its cost (fxquant.ptq.outlier_channels)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.encodings import EncodingsError
from fxquant.errors import ConfigError
from fxquant.metrics import sqnr
from fxquant.ptq.outlier_channels import split_outlier_channels
from fxquant.quantizer import TensorQuantizer

MASSIVE = (5, 77)  # the FFN hidden channels that get massive activations


class FFNBlock(nn.Module):
    """A pre-norm transformer FFN: LayerNorm -> Linear -> GELU -> Linear, plus the residual."""

    def __init__(self, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


def _model(massive: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = FFNBlock().eval()
    if massive:  # two hidden channels reach ~30-40 (the median channel's max is ~2), as trained FFNs have
        with torch.no_grad():
            for c, bias in zip(MASSIVE, (40.0, 30.0), strict=True):
                model.up.bias[c] = bias
                model.up.weight[c] *= 4
    return model


def _batches(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 16, 32, generator=g) for _ in range(n)]


def _prepare(model: nn.Module, backend: str, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(model, _batches(1)[0], backend=backend, config=fxquant.QuantConfig(**config))


@pytest.mark.smoke
@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime_dynamic", "tensorrt"])
def test_split_is_exact_in_float_and_names_the_channels(backend: str) -> None:
    model = _model()
    prepared = _prepare(model, backend)
    for q in prepared.modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("disabled")
    batches = _batches()
    report = split_outlier_channels(prepared, batches)
    assert report.data["layers"]["down"]["channels"] == list(MASSIVE)  # largest first
    assert len(report.done) == 1 and "`down`: input channel(s) [5, 77]" in report.done[0]
    down = prepared.get_submodule("down")
    assert float(down.weight.detach()[:, list(MASSIVE)].abs().max()) == 0.0  # the int8 Linear no longer sees them
    assert float(down.weight.abs().sum()) > 0
    assert "up" not in report.data["layers"]  # the LayerNorm output has no outlier channel
    for x in batches:
        torch.testing.assert_close(prepared(x), model(x), atol=1e-5, rtol=1e-5)


def _down_input_only_db(prepared: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """SQNR of the FFN branch with only the down-projection's input quantizer on (the one the split changes)."""
    down = next(n for n in prepared.graph.nodes if n.target == "down")
    feeding = down.args[0].target
    for name, q in prepared.named_modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("quant" if name == feeding else "disabled")
    db = sqnr(model(x) - x, prepared(x) - x)
    for q in prepared.modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("quant")
    return db


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime_dynamic", "tensorrt"])
def test_split_by_default_lifts_sqnr_and_exports_exact_ops(backend: str, tmp_path) -> None:
    model, batches = _model(), _batches()
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(7))
    results = {}
    for split in (False, "auto"):
        prepared = _prepare(model, backend, outlier_channels=split)
        fxquant.calibrate(prepared, batches, progress=False)
        db = _down_input_only_db(prepared, model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = fxquant.convert(prepared)
            exported = fxquant.export_onnx(q, x, tmp_path / f"{backend}_{split}.onnx", check_latency=False)
        results[split] = (db, exported, fxquant.report_of(q))
    (off_db, off, off_report), (on_db, on, on_report) = results[False], results["auto"]
    assert "outlier_channels" not in off_report.ptq
    assert on_report.ptq["outlier_channels"].data["layers"]["down"]["channels"] == list(MASSIVE)
    assert on_db >= off_db + 15.0, (on_db, off_db)  # measured +27 to +29 dB
    assert on.ort_sqnr_db >= 30.0
    # the side path: a Mul (the mask), one Gather of the two channels, one float MatMul and one Add
    added, removed = dict(on.op_counts - off.op_counts), dict(off.op_counts - on.op_counts)
    if backend == "onnxruntime":
        # the down Linear had a uint8 output (QGemm); now the side Add comes first, so it exports as
        # MatMulIntegerToFloat (bias inside, no DequantizeLinear on its input or weight) feeding that Add
        assert added == {"MatMulIntegerToFloat": 1, "Mul": 1, "Gather": 1}
        assert removed == {"DequantizeLinear": 2, "Transpose": 1}
    else:
        assert added == {"Mul": 1, "Gather": 1, "MatMul": 1, "Add": 1}
        assert removed == {}
    if backend == "tensorrt":  # the side MatMul is float by design: the lint adds no finding for it
        assert [f.op_type for f in on.trt_lint] == [f.op_type for f in off.trt_lint]
    else:  # ORT fuses every int8 op as before; the side path was never meant to be int8
        assert on.fusion.unfused == [] and on.fusion.intended == off.fusion.intended
    gather = next(n for n in on.model.graph.node if n.op_type == "Gather")
    index = next(t for t in on.model.graph.initializer if t.name == gather.input[1])
    assert list(torch.tensor(list(index.int64_data) or torch.frombuffer(bytearray(index.raw_data),
                                                                        dtype=torch.int64).tolist())) == list(MASSIVE)


def test_no_outliers_no_split_and_the_input_model_is_untouched() -> None:
    model, batches = _model(massive=False), _batches()
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = fxquant.quantize(model, batches[0], batches, backend="onnxruntime", progress=False)
        told = fxquant.quantize(_model(), batches[0], batches, backend="onnxruntime", progress=False,
                                config=fxquant.QuantConfig(outlier_channels=True))
    assert "outlier_channels" not in fxquant.report_of(quiet).ptq  # "auto": silent where nothing was split
    assert not any(n.target is torch.index_select for n in quiet.graph.nodes)
    assert fxquant.report_of(told).ptq["outlier_channels"].done
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    unsplit = fxquant.report_of(
        fxquant.quantize(model, batches[0], batches, backend="onnxruntime", progress=False,
                         config=fxquant.QuantConfig(outlier_channels=True))).ptq["outlier_channels"]
    assert unsplit.done == [] and unsplit.data.get("layers", {}) == {}


def test_small_gain_is_not_split_and_says_why() -> None:
    model = _model(massive=False)
    with torch.no_grad():  # one channel just above the ratio: splitting it barely helps
        model.up.bias[5] = 3.5
    batches = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxquant.quantize(model, batches[0], batches, backend="onnxruntime_dynamic", progress=False,
                             config=fxquant.QuantConfig(outlier_channels=True))
    report = fxquant.report_of(q).ptq["outlier_channels"]
    layers = report.data["layers"]
    if layers.get("down", {}).get("channels"):
        pytest.fail(f"split a channel that divides the error by {layers['down']['errors']}")
    assert any("divides the output error by less than" in s for s in report.skipped) or "down" not in layers


def test_bad_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="outlier_channels must be 'auto', True or False"):
        fxquant.QuantConfig(outlier_channels="yes")


def test_encodings_record_the_split_and_refuse_a_model_without_it(tmp_path) -> None:
    model, batches = _model(), _batches()
    calibrated = fxquant.calibrate(_prepare(model, "onnxruntime"), batches, progress=False)
    data = fxquant.save_encodings(calibrated, tmp_path / "enc.json")
    assert [line.split(":")[0] for line in data["calibrate_passes"]["outlier_channels"]] == ["`down`"]
    # a fresh prepare has not split `down`: the down input's range (without the massive channels) would clip them
    with pytest.raises(EncodingsError, match=r"outlier_channels and smoothquant changed differently \("
                                             r"outlier_channels: 1 change\(s\) in the file, 0 in this model; "
                                             r"smoothquant: 1 .*fxquant.calibrate\(prepared, batches\)"):
        fxquant.load_encodings(_prepare(model, "onnxruntime"), tmp_path / "enc.json")
    # the same split (calibrated on the same batches) takes the file, and converts to the same model
    again = fxquant.calibrate(_prepare(model, "onnxruntime"), batches, progress=False)
    fxquant.load_encodings(again, tmp_path / "enc.json")
    x = _batches(1)[0]
    torch.testing.assert_close(fxquant.convert(again)(x), fxquant.convert(calibrated)(x), atol=0, rtol=0)


def test_qat_after_calibrate_trains_the_outlier_weights() -> None:
    model, batches = _model(), _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxquant.calibrate(fxquant.prepare_qat(model, batches[0], backend="tensorrt"), batches, progress=False)
    side = dict(qat.named_parameters())["down_outlier_weight"]
    assert side.shape == (32, 2) and side.requires_grad
    before = side.detach().clone()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    qat.train()
    loss = qat(batches[0]).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert float((side.detach() - before).abs().max()) > 0  # the float path's weights learn
    assert float(qat.get_submodule("down").weight.detach()[:, list(MASSIVE)].abs().max()) == 0.0  # masked: no grad


class TwoReaders(nn.Module):
    """One LayerNorm output read by two Linears (as q/k/v are): one input quantizer, two side paths."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.a, self.b = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.a(h) * self.b(h)


def test_a_quantizer_read_by_two_linears_splits_both() -> None:
    torch.manual_seed(0)
    model = TwoReaders().eval()
    with torch.no_grad():
        model.norm.weight[7] = 40.0  # a LayerNorm outlier channel, left to the split (SmoothQuant off)
    batches = _batches()
    prepared = _prepare(model, "onnxruntime_dynamic", smoothquant=False)
    calibrated = fxquant.calibrate(prepared, batches, progress=False)
    layers = fxquant.report_of(calibrated).ptq["outlier_channels"].data["layers"]
    assert layers["a, b"]["channels"] == [7]
    sides = [n for n in calibrated.graph.nodes if n.target is torch.nn.functional.linear]
    assert len(sides) == 2
    for q in calibrated.modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("disabled")
    for x in batches:
        torch.testing.assert_close(calibrated(x), model(x), atol=1e-4, rtol=1e-5)


class ConvHead(nn.Module):
    """A CNN with a Linear classifier head: the split's only site, where no channel stands out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("setting", ["auto", True])
def test_a_cnn_head_runs_each_batch_once_and_says_why_it_stays(setting: object) -> None:
    torch.manual_seed(0)
    model = ConvHead().eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    prepared = fxquant.prepare(model, batches[0], backend="tensorrt",
                               config=fxquant.QuantConfig(outlier_channels=setting))
    calls = []
    prepared.get_submodule("fc").register_forward_pre_hook(lambda _m, _a: calls.append(1))
    fxquant.calibrate(prepared, batches, progress=False)
    assert len(calls) == 3  # the split decided on the ranges pass: no float pass of its own
    report = fxquant.report_of(prepared).ptq.get("outlier_channels")
    if setting == "auto":
        assert report is None  # nothing split: "auto" records nothing
    else:
        assert report.done == [] and len(report.skipped) == 1
        assert report.skipped[0].startswith("`fc`: no input channel's max |x| is above 8x the median channel's")


def test_the_split_on_the_ranges_pass_collects_its_quantizers_again() -> None:
    model, batches = _model(), _batches()
    prepared = fxquant.calibrate(_prepare(model, "tensorrt", smoothquant=False), batches, progress=False)
    assert fxquant.report_of(prepared).ptq["outlier_channels"].data["layers"]["down"]["channels"] == list(MASSIVE)
    down = next(n for n in prepared.graph.nodes if n.target == "down")
    act = prepared.get_submodule(down.args[0].target)
    with torch.no_grad():
        hidden = torch.cat([model.act(model.up(model.norm(x))).reshape(-1, 128) for x in batches])
    hidden[:, list(MASSIVE)] = 0
    lo, hi = act.calibrator.minmax()  # the masked input's exact extremes over each batch once, not the massive 40
    assert act.calibrator.num_batches == len(batches)
    assert (float(lo), float(hi)) == (float(hidden.min()), float(hidden.max()))
    assert float(hi) < 10
    weight = prepared.get_submodule("down")
    torch.testing.assert_close(weight.weight_quantizer.amax.flatten(), weight.weight.detach().abs().amax(1),
                               atol=0, rtol=0)  # per row, without the zeroed outlier columns
