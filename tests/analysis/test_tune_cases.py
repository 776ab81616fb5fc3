"""tune() on what users bring (issue 21 section 3): transformer exports (Linear weights read through a Transpose,
MatMulIntegerToFloat), a conv module called twice, and per-layer times that are steady-run medians."""

from __future__ import annotations

import copy
import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxquant
from fxquant.analysis.tune import float_layers
from fxquant.lower.ort.regions import RegionGraph, standard_form, with_float_layers
from fxquant.lower.ort.tune import layer_medians, profile_layers


class Block(nn.Module):
    """A pre-norm transformer block: attention projections, an FFN whose Linears feed float ops (GELU, the
    residual), MatMuls of two activations."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8, -1)
        x = x + self.o(att @ self.v(h))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class Twice(nn.Module):
    """One conv module called twice (a shared refinement step)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.refine = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.refine(torch.relu(self.refine(torch.relu(self.stem(x)))))


def _converted(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.quantize(model.eval(), x, [x, torch.randn_like(x)], backend="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(1, 32, 64)
    qmodel = _converted(nn.Sequential(Block(), Block()), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = fxquant.export_onnx(qmodel, x, tmp_path_factory.mktemp("t") / "t.onnx", check_latency=False).model
    return qmodel, x, proto


def test_every_linear_of_a_transformer_export_is_a_layer(transformer):
    # before: "0 of 0 weighted layers": the MatMuls read their weight through a Transpose (and MatMulIntegerToFloat)
    _, _, proto = transformer
    assert {n.op_type for n in proto.graph.node} >= {"MatMulIntegerToFloat", "Transpose"}
    regions = RegionGraph(standard_form(proto))
    layers = sorted({u.module for u in regions.layers.values()})
    assert layers == sorted(f"{b}.{name}" for b in (0, 1) for name in ("q", "k", "v", "o", "up", "down"))
    twin, removed = with_float_layers(proto)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat") for n in twin.graph.node)
    assert {f"{b}.{name}.weight_quantizer" for b in (0, 1) for name in ("q", "up")} <= removed


def test_tune_measures_each_layer_of_a_transformer(transformer):
    qmodel, x, proto = transformer
    tuned = fxquant.tune(qmodel, x, runs=5)
    assert tuned.units == 12  # before: 0, and the float model came back "because every int8 candidate was slower"
    regions = RegionGraph(standard_form(proto))
    times = profile_layers(standard_form(proto), [x.numpy()], regions.aliases(), runs=5)
    assert set(times) == set(regions.layers) and all(t > 0 for t in times.values())


def test_per_layer_times_are_medians_of_the_steady_runs():
    # before: the mean over every profiled run, ORT's first runs included (weight packing, arena growth: 20-30x a
    # steady run), so the summary printed "5 vs 134 us" for one layer of a model that runs 15 us whole
    events = []
    for run, (fc, other) in enumerate([(3000, 900), (400, 50), (130, 20), (5, 2), (6, 2), (5, 3), (4, 2), (9, 2)]):
        start = 1000 * run
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 900})
        events.append({"cat": "Node", "name": "fc/MatMul_kernel_time", "ts": start + 10, "dur": fc})
        events.append({"cat": "Node", "name": "fc_relu_token_3_kernel_time", "ts": start + 20, "dur": 1})
        events.append({"cat": "Node", "name": "conv/Conv_nchwc_kernel_time", "ts": start + 30, "dur": other})
    aliases = {"fc/MatMul": "fc", "fc_relu": "fc", "conv/Conv": "conv"}
    assert layer_medians(events, aliases) == {"fc": 6.0, "conv": 2.0}  # runs 4-8; fc's fused ReLU counted with it


def test_floating_a_conv_called_twice_removes_only_module_quantizers(tmp_path):
    # the deterministic half of the next test (which layers tune floats depends on the CPU's timings): floating
    # every layer removes both calls' int32-bias DQs (refine.bias_quantizer, refine.bias_1_quantizer), which no
    # module holds; the quantizers reported must be modules the torch model can swap, as tune does
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(1, 3, 16, 16)
    qmodel = _converted(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = fxquant.export_onnx(qmodel, x, tmp_path / "t.onnx", check_latency=False).model
    assert sum(n.name.startswith("refine.bias") for n in proto.graph.node) == 2  # one int32 bias per call
    twin, removed = with_float_layers(proto)
    assert not any("bias" in name for name in removed)
    modules = dict(qmodel.named_modules())
    assert {"stem.weight_quantizer", "refine.weight_quantizer"} <= removed <= set(modules)
    floated = copy.deepcopy(qmodel)
    float_layers(floated, {}, removed)  # before: ConversionError, "`refine.bias_1_quantizer` has no module"
    session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
    in_ort = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert fxquant.sqnr(model(x), floated(x)) > 35  # only the weights' 8-bit codes remain
        assert fxquant.sqnr(model(x), in_ort) > 35  # the ONNX twin is the same float-activation model


def test_tune_takes_a_conv_called_twice(tmp_path):
    # before: ConversionError "tune: the ONNX quantizer `refine.bias_1_quantizer` has no module in the model"
    x = torch.randn(1, 3, 16, 16)
    qmodel = _converted(Twice(), x)
    tuned = fxquant.tune(qmodel, x, runs=5)
    assert tuned.units == 2 and set(tuned.floated) <= {"stem", "refine"}
    summary = tuned.summary()
    assert summary.startswith(f"tune: {2 - len(tuned.floated)} of 2 weighted layers stay int8")
    result = fxquant.export_onnx(tuned.model, x, tmp_path / "t.onnx", check_latency=False)
    assert result.ort_sqnr_db > 30
