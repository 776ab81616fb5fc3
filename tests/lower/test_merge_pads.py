"""Asymmetric "same" padding (TF at stride 2, timm's Conv2dSame): the zero pad a torch conv cannot take is merged
into the ONNX Conv's ``pads`` at export, so the QDQ model has no float Pad and ORT fuses every conv
(fxquant.lower.onnx_passes.merge_pads); pads that cannot merge stay a Pad, with the reason, and still agree."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxquant
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.lower.onnx_passes import merge_pads
from fxquant.metrics import sqnr

torch.manual_seed(0)
X = torch.randn(8, 3, 16, 16)


class Conv2dSame(nn.Conv2d):
    """timm-style "same" convolution: zero-pads in forward as TF does (the odd pixel at the end), then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(X.shape[2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)  # X's size: the test feeds only that
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(0, 1)
    return bn.eval()


# (in, out, kernel, stride, groups) -> "same" pads: stem 3x3/2 [0,1], depthwise 3x3/2 [0,1], 3x3/1 [1,1]
# (symmetric: folded in torch), depthwise 5x5/2 [1,2], pointwise 1x1/1 (no pad)
LAYERS = [(3, 8, 3, 2, 1), (8, 8, 3, 2, 8), (8, 16, 3, 1, 1), (16, 16, 5, 2, 16), (16, 24, 1, 1, 1)]
PADS = [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2], [0, 0, 0, 0]]  # the ONNX Conv pads expected


class SameNet(nn.Module):
    """EfficientNet-Lite-style blocks: Conv2dSame -> BN -> ReLU6, depthwise ones among them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(Conv2dSame(i, o, k, s, groups=g, bias=False) for i, o, k, s, g in LAYERS)
        self.bns = nn.ModuleList(_bn(o) for _, o, _, _, _ in LAYERS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.relu6(bn(conv(x)))
        return x


def _export(model: nn.Module, tmp_path, backend: str = "onnxruntime"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = fxquant.prepare(model, X[:2], backend=backend,  # the pads alone: no bias correction
                                   config=fxquant.QuantConfig(bias_correction=False))
        fxquant.calibrate(prepared, [X], progress=False)
        quantized = fxquant.convert(prepared)
        result = fxquant.export_onnx(quantized, X, tmp_path / "m.onnx", check_latency=False)
    return prepared, quantized, result, [str(w.message) for w in caught]


def _optimized_ops(path) -> list[str]:
    out = str(path) + ".opt.onnx"
    ort_session(str(path), optimized_path=out)
    return [n.op_type for n in onnx.load(out).graph.node]


def test_same_padding_merges_into_the_convs_and_every_conv_fuses(tmp_path):
    prepared, quantized, result, messages = _export(SameNet().eval(), tmp_path)
    report = fxquant.report_of(prepared)
    merged = [s for s in report.skipped if "export_onnx merges it into the ONNX Conv pads" in s]
    assert len(merged) == 3 and all("is asymmetric" in s for s in merged), report.skipped
    assert report.float_ops == [] and not any("stay float" in m for m in messages), messages
    assert [e.detail for e in report.passthrough if e.kind == "pad"] == \
        [f"merged into the ONNX Conv pads of `{conv}` by export_onnx" for conv in ("conv2d", "conv2d_1", "conv2d_3")]
    ops = result.op_counts
    assert ops["Pad"] == 0 and ops["Conv"] == len(LAYERS)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert [next(list(a.ints) for a in n.attribute if a.name == "pads") for n in convs] == PADS
    # each Conv reads a DequantizeLinear directly; one Q/DQ pair per activation (input + 5 conv outputs)
    producer = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert [producer[n.input[0]] for n in convs] == ["DequantizeLinear"] * len(LAYERS)
    assert ops["QuantizeLinear"] == len(LAYERS) + 1
    optimized = _optimized_ops(tmp_path / "m.onnx")
    assert "Pad" not in optimized and optimized.count("QLinearConv") == len(LAYERS), optimized
    assert result.fusion.unfused == [] and result.fusion.intended == len(LAYERS)
    assert result.ort_sqnr_db >= 30
    # float level: ORT's reference semantics (no fused kernels) of the merged model against the fake-quant model
    with torch.no_grad():
        expected = quantized(X)
    got = torch.from_numpy(run_ort(ort_session(str(tmp_path / "m.onnx"), level="basic"), (X,))[0])
    assert sqnr(expected, got) >= 60
    assert (got - expected).abs().max() <= 1e-4


def test_tensorrt_export_merges_the_pads_too(tmp_path):
    _, _, result, _ = _export(SameNet().eval(), tmp_path, backend="tensorrt")
    assert result.op_counts["Pad"] == 0 and result.op_counts["Conv"] == len(LAYERS)
    assert result.ort_sqnr_db >= 30


def _qdq_pad_conv(pads: list[int], value: float | None = None, mode: str = "constant") -> onnx.ModelProto:
    """input -> Q -> DQ -> Pad -> Q -> DQ -> Conv (int8 weight through DequantizeLinear): the exported shape."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(np.array(pads, np.int64), "pads"),
             numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w_q"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wzp")]
    pad_inputs = ["x_dq", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
        pad_inputs.append("value")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"]),
             helper.make_node("Pad", pad_inputs, ["x_pad"], mode=mode),
             helper.make_node("QuantizeLinear", ["x_pad", "s", "zp"], ["p_q"]),
             helper.make_node("DequantizeLinear", ["p_q", "s", "zp"], ["p_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "ws", "wzp"], ["w"]),
             helper.make_node("Conv", ["p_dq", "w"], ["y"], strides=[2, 2], pads=[1, 0, 1, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 7, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("value", [None, 0.0])
def test_merged_model_computes_the_same_values(value, tmp_path):
    """Pad [0, 0, 1, 2 | 0, 0, 3, 0] (H: 1 before, 3 after; W: 2 before) after a DequantizeLinear and before the
    conv's Q/DQ: merged, the Conv pads add up, the requantization is dropped, and ORT gives the same output."""
    x = np.random.default_rng(1).uniform(0, 2, (1, 3, 9, 10)).astype(np.float32)
    original = _qdq_pad_conv([0, 0, 1, 2, 0, 0, 3, 0], value)
    merged = onnx.ModelProto.FromString(original.SerializeToString())
    assert merge_pads(merged) == 1
    onnx.checker.check_model(merged, full_check=True)
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("Pad") == 0 and ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    conv = next(n for n in merged.graph.node if n.op_type == "Conv")
    assert next(list(a.ints) for a in conv.attribute if a.name == "pads") == [2, 2, 4, 0]
    for level in ("basic", "all"):
        outs = []
        for proto in (original, merged):
            path = str(tmp_path / f"{level}_{len(proto.graph.node)}.onnx")
            onnx.save(proto, path)
            outs.append(ort_session(path, level=level).run(None, {"x": x})[0])
        assert outs[0].shape == outs[1].shape == (1, 4, 7, 5)
        np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pads, value, mode, why", [
    ([0, 0, 1, 1, 0, 0, 1, 1], None, "reflect", "reflect mode"),
    ([0, 0, 0, 1, 0, 0, 1, 0], 0.5, "constant", "a nonzero value"),
    ([0, 1, 0, 0, 0, 0, 0, 0], None, "constant", "a channel pad"),
    ([0, 0, -1, 0, 0, 0, 1, 0], None, "constant", "a crop"),
])
def test_other_pads_are_not_merged(pads, value, mode, why):
    proto = _qdq_pad_conv(pads, value, mode)
    assert merge_pads(proto) == 0, why
    assert [n.op_type for n in proto.graph.node].count("Pad") == 1


class KeptPads(nn.Module):
    """A reflect pad, a pad of 0.5 and a zero pad that also feeds an add: none of them can merge into a conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3, stride=2)
        self.c3 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(F.pad(x, (0, 1, 0, 1), mode="reflect")))
        x = torch.relu(self.c2(F.pad(x, (0, 1, 0, 1), value=0.5)))
        padded = F.pad(x, (0, 1, 0, 1))
        return self.c3(padded) + padded


def test_pads_that_cannot_merge_stay_with_their_reason_and_agree(tmp_path):
    prepared, _, result, _ = _export(KeptPads().eval(), tmp_path)
    report = fxquant.report_of(prepared)
    assert "pad `pad_2` not folded into `c3`: the pad [0, 1, 0, 1] is asymmetric (a torch convolution pads both " \
           "sides equally); `add` reads it too and is not a convolution that can take it, so it stays a float Pad" \
           in report.skipped, report.skipped
    floats = {e.node: e.detail for e in report.float_ops}
    assert set(floats) == {"pad", "pad_1", "pad_2"} and "no int8 Pad kernel" in floats["pad"]
    assert result.op_counts["Pad"] == 3
    assert "Pad" in _optimized_ops(tmp_path / "m.onnx")
    assert result.ort_sqnr_db >= 30
