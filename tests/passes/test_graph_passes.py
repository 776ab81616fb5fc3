"""Passes on the graph, not on module classes: a model whose convolutions are a timm-style ``Conv2dSame``
(an nn.Conv2d subclass whose forward pads "same" then calls F.conv2d) or plain ``F.conv2d`` on nn.Parameters gets
BN folding, explicit-pad folding, cross-layer equalization, AdaRound and bias correction exactly like the same
network written with nn.Conv2d modules. Shared and computed weights are declined with the reason."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.lower.onnx_export import ort_session
from fxquant.ptq.layers import float_mode
from fxquant.report import PTQReport

torch.manual_seed(0)
X = torch.randn(16, 3, 12, 12)
WIDTHS = [(3, 8, 3, 1), (8, 8, 3, 8), (8, 16, 1, 1)]  # (in, out, kernel, groups): conv, depthwise, pointwise
N_BN = len(WIDTHS)


class Conv2dSame(nn.Conv2d):
    """timm-style "same" convolution: zero-pads in forward, then F.conv2d on its own weight and bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = max(self.kernel_size[0] - self.stride[0], 0)  # TF "same" for inputs divisible by the stride
        x = F.pad(x, [total // 2, total - total // 2] * 2)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # randomized statistics: folding and equalization have something to do
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.05, 3)
        bn.bias.uniform_(-0.5, 1)
    return bn.eval()


class ModuleNet(nn.Module):
    """conv -> BN -> ReLU, depthwise -> BN -> ReLU, pointwise -> BN -> ReLU, pool, Linear: one CLE chain."""

    conv = nn.Conv2d

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(self.conv(i, o, k, padding=0 if self.conv is Conv2dSame else k // 2, groups=g,
                                             bias=False) for i, o, k, g in WIDTHS)
        self.bns = nn.ModuleList(_bn(o) for _, o, _, _ in WIDTHS)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = torch.relu(bn(conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SameNet(ModuleNet):
    conv = Conv2dSame


class FunctionalNet(nn.Module):
    """The same network with F.conv2d on nn.Parameters, no conv bias, explicit F.pad before each conv."""

    def __init__(self, ref: ModuleNet) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(c.weight.detach().clone()) for c in ref.convs)
        self.bns = ref.bns
        self.fc = ref.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (_, _, k, g), w, bn in zip(WIDTHS, self.weights, self.bns, strict=True):
            x = torch.relu(bn(F.conv2d(F.pad(x, (k // 2,) * 4), w, None, 1, 0, 1, g)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _models() -> dict[str, nn.Module]:
    ref = ModuleNet().eval()
    same = SameNet().eval()
    same.load_state_dict(ref.state_dict())
    return {"module": ref, "same": same, "functional": FunctionalNet(ref).eval()}


MODELS = _models()


def test_the_three_styles_compute_the_same_function():
    ref = MODELS["module"](X)
    for name in ("same", "functional"):
        assert torch.allclose(MODELS[name](X), ref, atol=1e-5), name


def _prepare(model: nn.Module, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a BatchNorm left unfolded would warn
        return fxquant.prepare(model, X[:4], backend="onnxruntime", config=fxquant.QuantConfig(**config))


@pytest.mark.parametrize("style", ["module", "same", "functional"])
@pytest.mark.parametrize("equalize", [False, True])
def test_every_batchnorm_folds_and_the_float_function_is_kept(style, equalize):
    model = MODELS[style]
    prepared = _prepare(model, equalize=equalize)
    report = fxquant.report_of(prepared)
    assert len(report.folded_bn) == N_BN
    assert not any(n.op == "call_module" and isinstance(prepared.get_submodule(n.target), nn.BatchNorm2d)
                   for n in prepared.graph.nodes)
    assert not any(n.target is F.pad for n in prepared.graph.nodes)  # every symmetric pad went into its conv
    with float_mode(prepared), torch.no_grad():
        assert torch.allclose(prepared(X), model(X), atol=1e-4)
    # every conv and the Linear get a weight quantizer: 3 convs + fc
    assert report.weight_quantizers == len(WIDTHS) + 1
    for p_model, p_ref in zip(model.parameters(), _models()[style].parameters(), strict=True):
        assert p_model.shape == p_ref.shape  # the user's model is not mutated (shapes; values checked above)


def test_equalization_finds_the_same_chains_in_every_style():
    chains, ranges = {}, {}
    for style, model in MODELS.items():
        eq = fxquant.report_of(_prepare(model, equalize=True)).ptq["equalize"]
        chains[style] = [len(c) for c in eq.data["chains"]]
        layers = [eq.data["layers"][name] for chain in eq.data["chains"] for name in chain]
        ranges[style] = torch.tensor([[v["imbalance_before"], v["imbalance_after"]] for v in layers])
        worst_before, worst_after = ranges[style].amax(0)
        assert worst_after < worst_before / 3, (style, ranges[style])
    assert chains["module"] == [N_BN + 1]  # conv -> dw -> pw -> fc
    assert chains["same"] == chains["functional"] == chains["module"]
    # the same per-layer channel-range ratios before and after, layer by layer
    assert torch.allclose(ranges["same"], ranges["module"], rtol=1e-3)
    assert torch.allclose(ranges["functional"], ranges["module"], rtol=1e-3)


@pytest.mark.parametrize("style", ["module", "same", "functional"])
def test_ort_optimized_graph_has_no_batchnorm_and_no_pad(style, tmp_path):
    prepared = _prepare(MODELS[style], equalize=True)
    fxquant.calibrate(prepared, [X], progress=False)
    quantized = fxquant.convert(prepared)
    fxquant.export_onnx(quantized, X[:2], tmp_path / "m.onnx")
    ort_session(str(tmp_path / "m.onnx"), optimized_path=str(tmp_path / "opt.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Pad" not in ops, ops
    assert ops.count("QLinearConv") == len(WIDTHS), ops


@pytest.mark.parametrize("style", ["module", "same", "functional"])
def test_adaround_and_bias_correction_run_on_every_layer(style):
    config = fxquant.QuantConfig(weight=fxquant.QuantSpec(num_bits=4, axis=None), equalize=True,
                                 adaround=fxquant.AdaRoundOptions(iterations=40, batch_size=8, num_samples=16),
                                 bias_correction="empirical")
    prepared = fxquant.prepare(MODELS[style], X[:4], backend="onnxruntime", config=config)
    fxquant.calibrate(prepared, [X[:8], X[8:]], progress=False)
    ptq = fxquant.report_of(prepared).ptq
    assert len(ptq["adaround"].data["codes"]) == len(WIDTHS) + 1, ptq["adaround"].summary()
    assert len(ptq["bias_correction"].done) == len(WIDTHS) + 1, ptq["bias_correction"].summary()
    blocks = ptq["adaround"].data["blocks"]
    assert sum(v["mse_reconstructed"] for v in blocks.values()) < sum(v["mse_nearest"] for v in blocks.values())


def test_a_leaf_conv_subclass_folds_when_its_forward_is_pad_then_conv():
    """Kept whole (leaf_modules), Conv2dSame is read by tracing its forward: pad + F.conv2d(x, weight, bias)."""
    model = MODELS["same"]
    prepared = fxquant.prepare(model, X[:4], backend="onnxruntime",
                               config=fxquant.QuantConfig(leaf_modules=("Conv2dSame",), equalize=True))
    report = fxquant.report_of(prepared)
    assert len(report.folded_bn) == N_BN
    assert [len(c) for c in report.ptq["equalize"].data["chains"]] == [N_BN + 1]
    with float_mode(prepared), torch.no_grad():
        assert torch.allclose(prepared(X), model(X), atol=1e-4)
    # no quantized twin for a subclass: it stays float, with the reason
    floats = {e.node: e.detail for e in report.float_ops}
    assert "subclass with no quantized form" in floats["convs_0"]


class SharedNet(nn.Module):
    """One parameter read by two F.conv2d calls, each followed by its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, 3, 3) * 0.3)
        self.bn1, self.bn2 = _bn(3), _bn(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(F.conv2d(torch.relu(self.bn1(F.conv2d(x, self.w, padding=1))), self.w, padding=1))


def test_shared_weight_is_declined_with_the_reason():
    with pytest.warns(UserWarning, match=r"BatchNorm `bn1` not folded: .*weight is shared with `conv2d_1`"):
        prepared = fxquant.prepare(SharedNet().eval(), X[:2], backend="onnxruntime")
    assert fxquant.report_of(prepared).folded_bn == []


class StdConv(nn.Module):
    """Weight standardization (timm's StdConv2d): the convolution reads a weight computed in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = _bn(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.w - self.w.mean((1, 2, 3), keepdim=True)) / (self.w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self.bn(F.conv2d(x, w))


def test_computed_weight_is_declined_with_the_reason():
    model = StdConv().eval()
    why = r"BatchNorm `bn` not folded: `conv2d` takes its weight from a computed tensor, not a parameter"
    with pytest.warns(UserWarning, match=why):
        prepared = fxquant.prepare(model, X[:2], backend="onnxruntime")
    assert fxquant.report_of(prepared).folded_bn == []
    with float_mode(prepared), torch.no_grad():
        assert torch.allclose(prepared(X), model(X), atol=1e-5)


class AsymmetricPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "same" at stride 2: more padding at the end


def test_asymmetric_pad_stays_in_torch_and_is_reported_as_merged_at_export():
    model = AsymmetricPad().eval()
    prepared = fxquant.prepare(model, X[:2], backend="onnxruntime")
    report = fxquant.report_of(prepared)
    assert "pad `pad` not folded into `conv` in the torch graph: the pad [0, 1, 0, 1] is asymmetric (a torch " \
           "convolution pads both sides equally); export_onnx merges it into the ONNX Conv pads (begin and end " \
           "apart), so no Pad runs" in report.skipped, report.skipped
    assert report.float_ops == []  # the export merges it (tests/lower/test_merge_pads.py)
    with float_mode(prepared), torch.no_grad():
        assert torch.equal(prepared(X), model(X))


def test_a_zero_pad_module_folds_into_the_conv():
    """EfficientNet's TF-ported Conv2dStaticSamePadding: nn.ZeroPad2d then F.conv2d on the module's weight."""
    model = nn.Sequential(nn.ZeroPad2d(2), nn.Conv2d(3, 4, 5), nn.ZeroPad2d((1, 1, 1, 1)), nn.Conv2d(4, 4, 3,
                                                                                                  padding=1)).eval()
    prepared = fxquant.prepare(model, X[:2], backend="onnxruntime")
    assert not any(isinstance(m, nn.ZeroPad2d) for m in prepared.modules())
    assert [m.padding for m in prepared.modules() if isinstance(m, nn.Conv2d)] == [(2, 2), (2, 2)]
    with float_mode(prepared), torch.no_grad():
        assert torch.allclose(prepared(X), model(X), atol=1e-6)


class ReLU6Net(nn.Module):
    """Depthwise-separable ReLU6 blocks (MobileNetV2-style activations)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights whatever ran before (the measured SQNR depends on them)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, padding=k // 2, groups=g, bias=False) for i, o, k, g in WIDTHS)
        self.bns = nn.ModuleList(_bn(o) for _, o, _, _ in WIDTHS)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = self.act(bn(conv(x)))
        return x


X6 = X * 4  # large enough that some activations reach ReLU6's clip


def _relu6_report(model: nn.Module, inputs: torch.Tensor = X6, **config) -> tuple[nn.Module, PTQReport]:
    config = fxquant.QuantConfig(equalize=True, **config)
    prepared = fxquant.prepare(model, inputs, backend="onnxruntime", config=config)
    return prepared, fxquant.report_of(prepared).ptq["equalize"]


def test_relu6_chains_are_equalized_on_request_and_the_change_is_measured():
    model = ReLU6Net().eval()
    _, off = _relu6_report(model, equalize_relu6=False)
    assert off.data["chains"] == [] and any("ReLU6 is not positively homogeneous" in s for s in off.skipped)
    prepared, eq = _relu6_report(model, equalize_relu6=True)
    assert [len(c) for c in eq.data["chains"]] == [N_BN]
    assert len(eq.data["relu6_replaced"]) == N_BN - 1  # the last ReLU6 is outside the chain and stays
    with float_mode(prepared), torch.no_grad():
        out = prepared(X6)
    assert eq.data["relu6_sqnr_db"] == pytest.approx(fxquant.metrics.sqnr(model(X6), out), abs=0.01)
    assert 5 < eq.data["relu6_sqnr_db"] < 60 and any("SQNR" in line for line in eq.done)


def test_relu6_default_is_decided_by_measurement():
    """Default (None): never with per-channel weights; with per-tensor weights only when turning the clips into
    ReLU keeps the float output SQNR on the example inputs at 30 dB or more."""
    model = ReLU6Net().eval()
    _, per_channel = _relu6_report(model)  # the onnxruntime preset quantizes weights per channel
    assert per_channel.data["chains"] == [] and "relu6_sqnr_db" not in per_channel.data
    per_tensor = fxquant.QuantSpec(axis=None)
    _, small = _relu6_report(model, X, weight=per_tensor)  # activations rarely reach 6
    assert small.data["relu6_sqnr_db"] >= 30 and [len(c) for c in small.data["chains"]] == [N_BN]
    _, large = _relu6_report(model, X6, weight=per_tensor)  # activations often reach 6
    assert large.data["relu6_sqnr_db"] < 30 and large.data["chains"] == []
    assert any(f"the float output SQNR would be {large.data['relu6_sqnr_db']:.1f} dB" in s for s in large.skipped)


def test_sensitivity_sees_the_same_layers_in_every_style():
    reports = {}
    for style, model in MODELS.items():
        prepared = _prepare(model)
        fxquant.calibrate(prepared, [X], progress=False)
        reports[style] = fxquant.sensitivity(prepared, [X], progress=False)
    kinds = {style: [layer.kind for layer in r.layers] for style, r in reports.items()}
    assert kinds["module"].count("conv") == len(WIDTHS)
    assert kinds["same"] == kinds["functional"] == kinds["module"]
    for style in ("same", "functional"):  # the same weights, quantized alike: the same per-layer SQNRs
        for a, b in zip(reports[style].layers, reports["module"].layers, strict=True):
            assert a.model_only_db == pytest.approx(b.model_only_db, abs=0.05), (style, a.name)
    # mixed precision keeps a layer float by name: a functional conv is named by its node
    worst = reports["functional"].ranked()[0]
    config = fxquant.QuantConfig(overrides=(fxquant.Override(worst.name, exclude=True),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the excluded layer is reported as float
        report = fxquant.report_of(fxquant.prepare(MODELS["functional"], X[:4], backend="onnxruntime", config=config))
    assert worst.name in {e.node for e in report.float_ops}
    assert report.weight_quantizers == len(WIDTHS)  # one fewer
