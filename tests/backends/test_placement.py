"""Golden quantizer placements on a zoo of tiny tricky topologies, for both backends.

A placement is (quantized tensor, the nodes its quantizer feeds). Node names are those torch.fx gives
(BatchNorm is folded away first, so it never appears).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.quantizer import TensorQuantizer

torch.manual_seed(0)


def placements(gm: torch.fx.GraphModule) -> set[tuple[str, tuple[str, ...]]]:
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TensorQuantizer):
            out.add((n.args[0].name, tuple(sorted(u.name for u in n.users))))
    return out


def quantizer_targets(gm: torch.fx.GraphModule) -> dict[str, str]:
    """quantized tensor name -> quantizer module name."""
    return {n.args[0].name: n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TensorQuantizer)}


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class FunctionalAddBlock(BasicBlock):
    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return torch.nn.functional.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c // 2, 1)
        self.conv2 = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.conv3 = nn.Conv2d(c // 2, c, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        return self.relu(self.conv3(out) + x)


class Downsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(8, 16, stride=2), conv_bn(16, 16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style: x + gamma * block(x), with the block in channels-last via permutes."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.gamma * y


class TwoInputAdd(nn.Module):
    """An add that is not a residual: its inputs share no ancestor."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, a, b):
        return self.c1(a) + self.c2(b)


class ConstantAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.c(x) + 1.0


class Concat(nn.Module):
    """Concat whose first input also feeds another conv: TensorRT needs one scale for both."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        return self.c3(torch.cat([a, b], dim=1)), self.c4(a)


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.conv(self.pool(torch.relu(self.conv(x))))


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.up(x).mean(dim=(2, 3)))


class DictIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return {"a": self.a(x), "b": torch.relu(self.b(y))}


def prep(model: nn.Module, *inputs: torch.Tensor, backend: str) -> torch.fx.GraphModule:
    return fxquant.prepare(model.eval(), inputs, backend=backend)


X8 = torch.randn(2, 8, 8, 8)
X3 = torch.randn(2, 3, 8, 8)


# ---- TensorRT -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [BasicBlock, FunctionalAddBlock])
def test_tensorrt_basic_block_quantizes_identity_only(block):
    gm = prep(block(), X8, backend="tensorrt")
    assert placements(gm) == {("x", ("add", "conv1")), ("relu", ("conv2",))}


def test_tensorrt_bottleneck():
    gm = prep(Bottleneck(), X8, backend="tensorrt")
    assert placements(gm) == {("x", ("add", "conv1")), ("relu", ("conv2",)), ("relu_1", ("conv3",))}


def test_tensorrt_downsample_shortcut_gets_the_quantizer():
    gm = prep(Downsample(), X8, backend="tensorrt")
    assert placements(gm) == {("x", ("conv1_0", "shortcut_0")), ("relu", ("conv2_0",)), ("shortcut_0", ("add",))}
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert "conv2_0" in [a.name for a in add.args]  # the main branch's conv output reaches the add unquantized


def test_tensorrt_layer_scale_residual():
    gm = prep(LayerScaleBlock(), X8, backend="tensorrt")
    assert placements(gm) == {("x", ("add", "dwconv")), ("permute", ("fc1",)), ("act", ("fc2",))}


def test_tensorrt_non_residual_add_stays_float_with_reason():
    with pytest.warns(UserWarning, match="share no ancestor"):
        gm = prep(TwoInputAdd(), X3, X3, backend="tensorrt")
    assert placements(gm) == {("a", ("c1",)), ("b", ("c2",))}
    floats = {e.node: e.detail for e in fxquant.report_of(gm).float_ops}
    assert "share no ancestor" in floats["add"]


def test_tensorrt_constant_add_needs_no_quantizer():
    with pytest.warns(UserWarning, match="adds a constant"):
        gm = prep(ConstantAdd(), X3, backend="tensorrt")
    assert placements(gm) == {("x", ("c",))}


def test_tensorrt_concat_inputs_share_one_scale():
    gm = prep(Concat(), X3, backend="tensorrt")
    assert placements(gm) == {("x", ("c1", "c2")), ("cat", ("c3",)), ("c1", ("c4",))}
    targets = quantizer_targets(gm)
    assert targets["cat"] == targets["c1"]  # one module: one scale for the concat and its input
    assert targets["x"] != targets["cat"]


def test_tensorrt_reused_module_quantizes_both_call_sites_and_one_weight():
    gm = prep(Reused(), torch.randn(2, 4, 8, 8), backend="tensorrt")
    assert placements(gm) == {("x", ("conv",)), ("pool", ("conv_1",))}
    report = fxquant.report_of(gm)
    assert (report.activation_quantizers, report.weight_quantizers) == (2, 1)


def test_tensorrt_weight_axes():
    gm = prep(Transposed(), torch.randn(2, 4, 5, 5), backend="tensorrt")
    fxquant.calibrate(gm, [torch.randn(2, 4, 5, 5)], progress=False)
    up = gm.get_submodule("up").weight_quantizer
    assert up.spec.axis == 1 and up.amax.shape == (3,)  # ConvTranspose weight (in, out/groups, k, k)
    head = gm.get_submodule("head").weight_quantizer
    assert head.spec.axis == 0 and head.amax.shape == (3,)
    assert torch.allclose(head.amax, gm.get_submodule("head").weight.abs().amax(dim=1))


def test_depthwise_weight_is_per_channel():
    model = nn.Sequential(*conv_bn(8, 8, groups=8), nn.ReLU())
    gm = prep(model, X8, backend="tensorrt")
    fxquant.calibrate(gm, [X8], progress=False)
    assert gm.get_submodule("0").weight_quantizer.amax.shape == (8,)


def test_dict_outputs_and_two_inputs_export(tmp_path):
    model = DictIO().eval()
    for backend in ("tensorrt", "onnxruntime"):
        q = fxquant.quantize(model, (X3, X3), [(X3, X3)], backend=backend, progress=False)
        result = fxquant.export_onnx(q, (X3, X3), tmp_path / f"dict_{backend}.onnx")
        assert len(result.model.graph.output) == 2
        assert result.ort_sqnr_db > 35


# ---- ONNX Runtime -------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_onnxruntime_basic_block_quantizes_every_op_boundary():
    gm = prep(BasicBlock(), X8, backend="onnxruntime")
    # conv+relu absorbed: one quantizer after each relu; the add sees Q/DQ on both inputs and its output
    assert placements(gm) == {("x", ("add", "conv1")), ("relu", ("conv2",)), ("conv2", ("add",)),
                              ("relu_1", ("output",))}


def test_onnxruntime_max_pool_and_concat_share_scales():
    gm = prep(Concat(), X3, backend="onnxruntime")
    targets = quantizer_targets(gm)
    assert targets["c1"] == targets["c2"] == targets["cat"]
    gm = prep(Reused(), torch.randn(2, 4, 8, 8), backend="onnxruntime")
    targets = quantizer_targets(gm)
    assert targets["relu"] == targets["pool"]
    assert placements(gm) == {("x", ("conv",)), ("relu", ("pool",)), ("pool", ("conv_1",)), ("conv_1", ("output",))}


def test_onnxruntime_specs_are_uint8_activations_and_7bit_weights():
    gm = prep(BasicBlock(), X8, backend="onnxruntime")
    act = gm.get_submodule(quantizer_targets(gm)["x"]).spec
    weight = gm.get_submodule("conv1").weight_quantizer.spec
    assert (act.symmetric, act.qmin, act.qmax) == (False, 0, 255)
    assert (weight.axis, weight.qmin, weight.qmax) == (0, -63, 63)


def test_config_overrides_and_exclusions():
    config = fxquant.QuantConfig(
        weight=fxquant.QuantSpec(num_bits=8, axis=0, narrow_range=True),
        overrides=(fxquant.Override("conv2", exclude=True),),
    )
    with pytest.warns(UserWarning, match="excluded"):
        gm = fxquant.prepare(BasicBlock().eval(), X8, backend="tensorrt", config=config)
    assert placements(gm) == {("x", ("add", "conv1"))}
    assert gm.get_submodule("conv1").weight_quantizer.spec.qmax == 127
    assert not hasattr(gm.get_submodule("conv2"), "weight_quantizer")
    floats = {e.node: e.detail for e in fxquant.report_of(gm).float_ops}
    assert floats["conv2"] == "excluded by Override('conv2')"


def test_inserted_nodes_record_provenance():
    gm = prep(BasicBlock(), X8, backend="tensorrt")
    q = next(n for n in gm.graph.nodes if n.op == "call_module" and n.args and n.args[0].name == "x")
    assert q.meta["fxquant"].made_by == "insert_quantizers"
    assert set(q.meta["fxquant"].quantizer.rules) == {"weighted_input", "residual_add"}
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert add.meta["fxquant"].rule == "tensorrt.residual_add"


class FunctionalConv(nn.Module):
    """A conv written with F.conv2d and the module's own parameters (no nn.Conv2d to swap)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        return torch.relu(nn.functional.conv2d(x, self.weight, self.bias, padding=1)).mean((2, 3))


def test_functional_conv_weight_is_a_constant_quantizer(tmp_path):
    # its weight quantizer is calibrated once, counted as a weight, and exported without a Clip on its codes
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    prepared = fxquant.prepare(FunctionalConv().eval(), batches[0], backend="onnxruntime")
    fxquant.calibrate(prepared, batches, progress=False)
    weight_q = [q for n, q in prepared.named_modules() if isinstance(q, TensorQuantizer) and q.constant]
    assert len(weight_q) == 1 and weight_q[0].calibrator.num_batches == 1
    # the backend's weight spec, raised to 8 bits after calibration (saturation-aware weights: ORT pairs along
    # the reduction dimension cannot overflow int16 with this layer's codes, or their channels are widened)
    assert weight_q[0].spec.num_bits == 8 and weight_q[0].spec.axis == 0
    assert "conv2d" in fxquant.report_of(prepared).ptq["weight_bits"].data
    assert fxquant.report_of(prepared).weight_quantizers == 1
    result = fxquant.export_onnx(fxquant.convert(prepared), batches[0], tmp_path / "functional.onnx")
    assert not [n for n in result.model.graph.node if n.op_type == "Clip"]
    assert result.ort_sqnr_db > 35



class SameConv(nn.Conv2d):
    """TF-style "same" padding written in the module's own forward (EfficientNet-Lite's Conv2dStaticSamePadding,
    timm's Conv2dSame): tracing records an F.pad and an F.conv2d inside the module, not a call of it."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride)


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv(3, 8, 3, stride=2)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize(("pattern", "floats"), [("stem", {"conv2d"}), ("SameConv", {"conv2d"}),
                                                 ("block", {"block_0", "block_2"}), ("head", {"head"})])
def test_override_matches_the_ops_a_module_runs_in_its_forward(pattern, floats):
    # a glob on a module name or class matches the functional ops that run inside that module's forward too
    # (tracing's module stack), not only a call of the module itself
    torch.manual_seed(0)
    config = fxquant.QuantConfig(overrides=(fxquant.Override(pattern, exclude=True),))
    with pytest.warns(UserWarning, match="stay float"):
        gm = fxquant.prepare(Stem().eval(), torch.randn(1, 3, 16, 16), backend="onnxruntime", config=config)
    excluded = {e.node for e in fxquant.report_of(gm).float_ops if e.detail == f"excluded by Override({pattern!r})"
                and e.kind in ("conv", "linear")}
    assert excluded == floats
    weights = {n for n, q in gm.named_modules() if isinstance(q, TensorQuantizer) and q.constant}
    assert len(weights) == 4 - len(floats)  # every other conv and linear keeps its weight quantizer

# ---- residual streams read only by float ops ----------------------------------------------------------------
class PreNormBlocks(nn.Module):
    """Two pre-norm transformer blocks and a final LayerNorm: the residual stream is read only by LayerNorms
    (and by the next add), and one block reads its width from x.shape."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(5))
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.embed(x)
        for i in range(4):
            x = x + self.fcs[i](self.lns[i](x)).reshape(-1, x.shape[1], x.shape[-1])
        return self.head(self.lns[4](x))


class PostNormBlock(nn.Module):
    """BERT-style post-norm: LayerNorm(x + f(x)), then a Linear; and a ResNet-style add -> ReLU -> Linear."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.f, self.g, self.ln = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)
        self.out, self.out2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = self.out(self.ln(x + self.f(x)))
        return self.out2(torch.relu(y + self.g(y)))


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_adds_read_only_by_float_ops_stay_float_with_reason(backend):
    tokens = torch.randn(2, 5, 16)
    gm = prep(PreNormBlocks(), tokens, backend=backend)
    report = fxquant.report_of(gm)
    adds = {e.node: e.detail for e in report.float_ops if e.kind == "add"}
    assert sorted(adds) == ["add", "add_1", "add_2", "add_3"]
    assert not [e for e in report.quantized if e.kind == "add"]
    assert "layer_norm `lns_1`" in adds["add"] and "feeds only ops that run in floating point" in adds["add"]
    assert "layer_norm `lns_4`" in adds["add_3"]
    # every Linear keeps its input quantizer; none sits on the residual stream itself
    streams = {"embed", "add", "add_1", "add_2", "add_3"}
    assert not [q for q in placements(gm) if q[0] in streams and backend == "tensorrt"]

    gm = prep(PostNormBlock(), tokens, backend=backend)
    report = fxquant.report_of(gm)
    floats = {e.node: e.detail for e in report.float_ops if e.kind == "add"}
    assert list(floats) == ["add"] and "layer_norm `ln`" in floats["add"]
    assert [e.node for e in report.quantized if e.kind == "add"] == ["add_1"]  # add -> ReLU -> Linear: int8


# ---- image stems ----------------------------------------------------------------------------------------------
class ImageNet(nn.Module):
    """A stem conv on the image (optionally behind a zero pad, as TF-style "same" padding writes it), then a body."""

    def __init__(self, kernel: int = 3, pad: bool = False) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if pad else None
        self.stem = nn.Conv2d(3, 8, kernel, stride=2, padding=0 if pad else kernel // 2)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.body(nn.functional.relu6(self.stem(x if self.pad is None else self.pad(x)))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(("model", "size", "backend", "float_stem", "stays_float"), [
    (ImageNet(), 96, "onnxruntime", None, True),  # 3 x 3 x 3 = 27 products on a 48 x 48 map: float
    (ImageNet(pad=True), 96, "onnxruntime", None, True),  # behind a zero pad too
    (ImageNet(kernel=7), 96, "onnxruntime", None, False),  # ResNet's 7 x 7 x 3 = 147: int8 is faster there
    (ImageNet(), 32, "onnxruntime", None, False),  # a 16 x 16 map: no image stem measured
    (ImageNet(), 96, "onnxruntime", False, False),
    (ImageNet(), 96, "tensorrt", None, False),
    (ImageNet(kernel=7), 32, "tensorrt", True, True)])
def test_image_stems_stay_float_where_the_backend_measured_it_pays(model, size, backend, float_stem, stays_float,
                                                                    tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, size, size)
    config = fxquant.QuantConfig(float_stem=float_stem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model.eval(), x[:1], backend=backend, config=config)
        fxquant.calibrate(prepared, [x], progress=False)
    floats = {e.node: e.detail for e in fxquant.report_of(prepared).float_ops if e.kind == "conv"}
    assert (set(floats) == {"stem"}) == stays_float and set(floats) <= {"stem"}, floats
    assert hasattr(prepared.get_submodule("stem"), "weight_quantizer") != stays_float
    if stays_float:
        assert floats["stem"].startswith("a stem conv (reads the model input")
    with pytest.raises(fxquant.ConfigTypeError, match="float_stem must be None"):
        fxquant.QuantConfig(float_stem="yes")
    if backend == "onnxruntime":  # int8 after the stem, and ORT runs what the fake-quant model computes
        result = fxquant.export_onnx(fxquant.convert(prepared), x, tmp_path / "m.onnx", check_latency=False)
        assert result.fusion.unfused == [] and result.ort_sqnr_db > 35
        producer = {o: n.op_type for n in result.model.graph.node for o in n.output}
        stem = next(n for n in result.model.graph.node if n.op_type == "Conv" and "stem" in n.name)
        assert producer.get(stem.input[0], "input") == ("input" if stays_float else "DequantizeLinear")
