"""Sensitivity analysis: numbers against a hand-computed two-layer case, exclusion semantics, the HTML report."""

from __future__ import annotations

import base64
import math
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import Override, QuantConfig, QuantSpec
from fxquant.analysis.sensitivity import quantized_units, sensitivity
from fxquant.analysis.sensitivity_report import NO_MATPLOTLIB, render_html
from fxquant.cli.demo_model import DigitsNet

W4A4 = QuantConfig(weight=QuantSpec(4, axis=0, narrow_range=True), activation=QuantSpec(4, calib_method="max"))


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def fake_quant(t: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Symmetric quantize-dequantize written out: step = amax / qmax, codes clamped to [qmin, qmax]."""
    step = amax / qmax
    return torch.clamp(torch.round(t / step), qmin, qmax) * step


def db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - test).pow(2).sum().item())


@pytest.fixture(scope="module")
def two_layer():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x = torch.randn(256, 6)
    prepared = fxquant.prepare(model, x[:1], backend="tensorrt", config=W4A4)
    fxquant.calibrate(prepared, [x[:128], x[128:]], progress=False)
    return model, x, prepared


def test_two_layer_sqnr_matches_the_quantizer_math_by_hand(two_layer):
    model, x, prepared = two_layer
    with torch.no_grad():
        before = prepared(x)
        report = sensitivity(prepared, [x[:128], x[128:]], progress=False)
        # by hand: TensorRT placement quantizes each Linear's input (4-bit signed, [-8, 7], max calibration on
        # float data) and its weight (4-bit per output channel, narrow [-7, 7])
        w1, b1, w2, b2 = model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias
        h = F.relu(F.linear(x, w1, b1))
        y = F.linear(h, w2, b2)
        qx = fake_quant(x, x.abs().max(), -8, 7)
        qw1 = fake_quant(w1, w1.abs().amax(1, keepdim=True), -7, 7)
        qw2 = fake_quant(w2, w2.abs().amax(1, keepdim=True), -7, 7)
        fc1_q = F.linear(qx, qw1, b1)
        only_fc1 = F.linear(F.relu(fc1_q), w2, b2)
        only_fc2 = F.linear(fake_quant(h, h.max(), -8, 7), qw2, b2)
        both = F.linear(fake_quant(F.relu(fc1_q), h.max(), -8, 7), qw2, b2)
    fc1, fc2 = report.layers
    assert (fc1.name, fc1.kind, fc2.name, fc2.kind) == ("fc1", "linear", "fc2", "linear")
    assert fc1.quantizers == ("x_to_fc1_quantizer", "fc1.weight_quantizer")
    expected = {"fc1": (db(y, only_fc1), db(y, only_fc1), db(F.linear(x, w1, b1), fc1_q)),
                "fc2": (db(y, only_fc2), db(y, both), db(y, only_fc2))}
    for s in report.layers:
        only, upto, out_only = expected[s.name]
        assert s.model_only_db == pytest.approx(only, abs=0.01), s
        assert s.model_cumulative_db == pytest.approx(upto, abs=0.01), s
        assert s.output_only_db == pytest.approx(out_only, abs=0.01), s
    assert report.full_db == pytest.approx(db(y, both), abs=0.01)
    assert 5.0 < report.full_db < 30.0  # 4 bits: a clearly lossy case, not a trivial one
    ranked = report.ranked()
    assert ranked[0].model_only_db <= ranked[1].model_only_db and [s.rank for s in ranked] == [1, 2]
    # the model is handed back as it came: every quantizer on, same output
    assert all(q.mode == "quant" for q in prepared.modules() if isinstance(q, fxquant.TensorQuantizer))
    with torch.no_grad():
        assert torch.equal(prepared(x), before)


def test_only_one_layer_equals_excluding_all_others():
    """'Only this layer quantized' means what Override(exclude=True) on every other layer gives (ORT preset,
    where quantizers are shared between neighbouring layers)."""
    torch.manual_seed(1)
    model = DigitsNet(width=8).eval()
    x = torch.randn(64, 1, 8, 8)
    prepared = fxquant.prepare(model, x[:1], backend="onnxruntime")
    fxquant.calibrate(prepared, [x], progress=False)
    report = sensitivity(prepared, [x], progress=False)
    layers = quantized_units(prepared)
    assert len(layers) == len(report.layers) == 14
    with torch.no_grad():
        reference = model(x)
    for name in ("block2.pointwise.0", "add_1"):
        others = tuple(Override(layer.pattern, exclude=True) for layer in layers if layer.name != name)
        with pytest.warns(UserWarning, match="stay float"):
            alone = fxquant.prepare(model, x[:1], backend="onnxruntime", config=QuantConfig(overrides=others))
        fxquant.calibrate(alone, [x], progress=False)
        with torch.no_grad():
            expected = fxquant.sqnr(reference, alone(x))
        got = next(s for s in report.layers if s.name == name)
        assert got.model_only_db == pytest.approx(expected, abs=0.05), name
    assert report.layers[-1].model_cumulative_db == pytest.approx(report.full_db, abs=1e-6)
    with torch.no_grad():
        assert report.full_db == pytest.approx(fxquant.sqnr(reference, prepared(x)), abs=0.05)


def test_html_report_embeds_the_plot_and_ranks_every_layer(two_layer, tmp_path):
    pytest.importorskip("matplotlib")
    _, x, prepared = two_layer
    report = sensitivity(prepared, [x], progress=False)
    path = report.write_html(tmp_path / "report.html")
    text = open(path, encoding="utf-8").read()
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert text.count("<tr><td>") == len(report.layers) == 2
    assert "src=\"http" not in text and "<link" not in text  # self-contained


def test_html_report_without_matplotlib_keeps_the_table(two_layer, monkeypatch):
    _, x, prepared = two_layer
    report = sensitivity(prepared, [x], progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the [report] extra sees
    text = render_html(report)
    assert "data:image/png" not in text and NO_MATPLOTLIB.split(",")[0] in text
    assert text.count("<tr><td>") == 2


def test_sensitivity_rejects_uncalibrated_models_and_single_tensors(two_layer):
    model, x, prepared = two_layer
    fresh = fxquant.prepare(model, x[:1], backend="tensorrt")
    with pytest.raises(fxquant.CalibrationError, match=r"after fxquant\.calibrate"):
        sensitivity(fresh, [x], progress=False)
    with pytest.raises(TypeError, match="wrap it"):
        sensitivity(prepared, x, progress=False)


class DataDependent(nn.Module):
    """torch.fx cannot trace the root (a branch on data), so fxquant prepares it in parts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = h.relu()
        return self.fc2(h)


def test_models_prepared_in_parts_are_refused_with_a_reason():
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(DataDependent().eval(), x[:1])
    if isinstance(prepared, torch.fx.GraphModule):
        pytest.skip("this torch traced the model whole")
    fxquant.calibrate(prepared, [x], progress=False)
    with pytest.raises(TypeError, match="prepared in parts"):
        sensitivity(prepared, [x], progress=False)
