"""fxquant.tune and the ONNX regions it floats (fxquant.lower.ort.regions / fxquant.lower.ort.tune)."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxquant
from fxquant.analysis.tune import float_layers
from fxquant.lower.ort.regions import RegionGraph, with_float_layers
from fxquant.lower.ort.tune import Candidate, choose


class Wide(nn.Module):
    """Big 3x3 convs (int8 wins in ORT) and a tiny classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv2(torch.relu(self.conv1(y))) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model = Wide().eval()
    data = [torch.rand(2, 3, 48, 48) for _ in range(3)]
    config = fxquant.QuantConfig(float_stem=False)  # every layer int8, the stem too: tune decides what floats
    qmodel = fxquant.quantize(model, data[0][:1], data, backend="onnxruntime", config=config, progress=False)
    return model, data, qmodel


def _export(qmodel, x, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxquant.export_onnx(qmodel, x, path)
    return result, [str(w.message) for w in caught]


def _run(proto, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_regions_split_units_from_glue(wide, tmp_path):
    _, data, qmodel = wide
    proto, _ = _export(qmodel, data[0][:1], tmp_path / "w.onnx")
    regions = RegionGraph(proto.model)
    assert sorted(u.module for u in regions.layers.values()) == ["conv1", "conv2", "fc", "stem"]
    assert {u.weight_quantizer for u in regions.layers.values()} == {f"{m}.weight_quantizer"
                                                                  for m in ("conv1", "conv2", "fc", "stem")}
    # the residual add, its ReLU, the pool and the flatten sit in one glue component touching stem, conv2, fc
    fc = next(n for n, u in regions.layers.items() if u.module == "fc")
    touched = [regions.touches[c] for c in set(regions.component.values()) if fc in regions.touches.get(c, ())]
    assert sorted(sorted(regions.layers[u].module for u in t) for t in touched) == [
        ["conv1", "conv2", "fc", "stem"], ["fc"]]


def test_floating_one_layer_removes_exactly_its_conversions(wide, tmp_path):
    model, data, qmodel = wide
    result, _ = _export(qmodel, data[0][:1], tmp_path / "w.onnx")
    fc = next(n.name for n in result.model.graph.node if n.name.startswith("fc/"))
    proto, removed = with_float_layers(result.model, {fc})
    before, after = result.op_counts, Counter(n.op_type for n in proto.graph.node)
    # fc's weight and int32 bias DQs and its output pair go; its input pair feeds nothing else but stays: the
    # pool before it is int8 (the component touches int8 convs). The int32 bias is made at export: no module
    assert removed == {"fc.weight_quantizer", "fc_quantizer"}
    assert before["DequantizeLinear"] - after["DequantizeLinear"] == 3
    assert before["QuantizeLinear"] - after["QuantizeLinear"] == 1
    # the same change made in torch (quantizers -> Identity) exports the same graph and agrees with ORT
    tuned = copy.deepcopy(qmodel)
    float_layers(tuned, {fc: "test"}, removed)
    exported, _ = _export(tuned, data[0][:1], tmp_path / "t.onnx")
    assert exported.op_counts == after - Counter({"Identity": 1})  # the ONNX edit keeps the output's name
    x = data[1]
    # they differ only in fc's weight: its 8-bit codes dequantized (the timing candidate) vs the float weight
    assert fxquant.sqnr(_run(proto, x), _run(exported.model, x)) > 40.0
    assert exported.ort_sqnr_db > 30.0
    with torch.no_grad():  # fc in float: at least as close to the float model as the int8 one
        ref = model(x)
        assert fxquant.sqnr(ref, tuned(x)) >= fxquant.sqnr(ref, qmodel(x)) - 0.5


def test_floating_every_unit_is_the_float_twin(wide, tmp_path):
    model, data, qmodel = wide
    result, _ = _export(qmodel, data[0][:1], tmp_path / "w.onnx")
    proto, removed = with_float_layers(result.model)
    assert not {n.op_type for n in proto.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    quantizers = {n for n, m in qmodel.named_modules() if type(m).__name__ == "FrozenQuantizer"}
    assert quantizers <= removed
    with torch.no_grad():
        assert fxquant.sqnr(model(data[1]), _run(proto, data[1])) > 30.0  # only the 8-bit weight codes remain


def test_tune_takes_the_fastest_measured_candidate_and_exports_it(wide, tmp_path):
    """Which layers pay in int8 is the CPU's to say (on AVX2 this head floats alone, on AMX the 3-channel stem
    too): the test checks the choice against tune's own measurements, not a layer list one CPU gives."""
    _, data, qmodel = wide
    result = fxquant.tune(qmodel, data[0][:1])
    assert result.units == 4
    measured = {len(c.floated): c for c in result.candidates}
    assert 0 in measured and 4 in measured  # all-int8 and all-float are always candidates
    chosen = next(c for c in result.candidates if {_layer(u) for u in c.floated} == set(result.floated))
    assert chosen == choose(result.candidates) and result.speedup == pytest.approx(chosen.speedup)
    assert chosen.ms <= chosen.float_ms or len(chosen.floated) == 4  # never slower than float as measured
    assert all(why.startswith(("int8 is not faster", "int8 saves only")) for why in result.floated.values())
    exported, _ = _export(result.model, data[0][:1], tmp_path / "t.onnx")
    assert exported.ort_sqnr_db > 30.0
    assert exported.fusion is not None and not exported.fusion.unfused
    int8_layers = {"stem", "conv1", "conv2", "fc"} - set(result.floated)  # each still has its Q/DQ in the file
    assert {i.name.removesuffix(".weight_quantized") for i in exported.model.graph.initializer
            if i.name.endswith(".weight_quantized")} == int8_layers
    assert qmodel.stem.weight_quantizer is not None  # the input model is left as it was
    assert any(type(m).__name__ == "FrozenQuantizer" for m in qmodel.modules())


@pytest.mark.parametrize(("times", "floated"), [
    ({0: 0.50, 1: 0.45, 2: 0.48, 4: 0.90}, 1),  # int8 pays but for the head: float the head alone
    ({0: 0.40, 1: 0.40, 2: 0.45, 4: 0.90}, 0),  # a tie: fewer float layers
    ({0: 1.00, 1: 0.95, 2: 0.92, 4: 0.90}, 4),  # every int8 candidate slower than float: the float model
    ({0: 0.90, 1: 0.95, 2: 0.97, 4: 0.90}, 0),  # all-int8 as fast as float: kept
])
@pytest.mark.smoke
def test_choice_given_measurements(times, floated):
    """The decision alone, on given timings (ms; the float twin measured 0.90 ms)."""
    order = ("fc", "stem", "conv1", "conv2")
    candidates = [Candidate(order[:k], ms, 0.90) for k, ms in times.items()]
    assert len(choose(candidates).floated) == floated


def _layer(unit: str) -> str:
    return unit.rpartition("/")[0] or unit


def test_tune_floats_a_model_int8_cannot_speed_up(digits, tmp_path):
    model, (x_train, _, x_test, _) = digits
    batches = [x_train[i * 64:(i + 1) * 64] for i in range(4)]
    qmodel = fxquant.quantize(model, x_test[:1], batches, backend="onnxruntime", progress=False)
    result = fxquant.tune(qmodel, x_test[:1])
    # the digits CNN at batch 1 (9 layers of <= 32 channels on 8x8 pixels): ~0.035 ms int8 vs ~0.023 ms float
    # here; ORT's int8 kernels do not pay at that size, so every layer goes float
    assert result.units == 9
    assert len(result.floated) == 9
    report = fxquant.report_of(result.model)
    tuned_rows = [e for e in report.float_ops if e.detail.startswith("tune: ")]
    assert sorted(e.node for e in tuned_rows) == sorted(result.floated)
    exported, messages = _export(result.model, x_test[:1], tmp_path / "t.onnx")
    assert not {n.op_type for n in exported.model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert exported.latency is None  # nothing int8 left to time, so no "slower" warning
    assert not any("runs slower in ONNX Runtime" in m for m in messages)
    assert exported.ort_sqnr_db > 60.0


def test_tune_refuses_what_it_cannot_measure(wide):
    model, data, _ = wide
    trt = fxquant.quantize(model, data[0][:1], data, backend="tensorrt", progress=False)
    with pytest.raises(fxquant.ConfigError, match="backend='onnxruntime'"):
        fxquant.tune(trt, data[0][:1])
    dynamic = fxquant.quantize(model, data[0][:1], data, backend="onnxruntime_dynamic", progress=False)
    with pytest.raises(fxquant.ConfigError, match="tune works on static int8 models"):
        fxquant.tune(dynamic, data[0][:1])
    with pytest.raises(fxquant.ConversionError, match=r"fxquant\.convert"):
        fxquant.tune(model, data[0][:1])
    with pytest.raises(fxquant.ConfigError, match="runs must be"):
        fxquant.tune(wide[2], data[0][:1], runs=1)
