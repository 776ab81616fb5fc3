"""Saturation-aware weights for ORT's u8s8 kernels (fxquant.ptq.weight_widths), checked in ORT running as a
pre-VNNI x86 CPU (AVX2): natively on such a machine, under qemu-x86_64 -cpu Haswell-v4 on a VNNI one."""

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
from fxquant.backends.onnxruntime import ONNXRUNTIME
from fxquant.lower.ort.targets import run_many_as
from fxquant.ptq.weight_widths import reduction_rows, saturating_pairs, widen
from fxquant.quantizer import TensorQuantizer
from tests.cpus import needs_avx2, needs_vnni


def ort_conv_errors(cases: list[tuple[np.ndarray, int]], target: str, tmp_path) -> list[float]:
    """ORT (all optimizations: QLinearConv) as the CPU ``target`` on an all-ones input (uint8 code 255) through a
    1-output-pixel QDQ conv per (weight ``codes``, groups) case (scale 1), all in one ORT process; the exact
    result is ``codes.sum()`` per output channel. Each case's error in output steps."""
    jobs, steps = [], []
    for k, (codes, groups) in enumerate(cases):
        path, shape, step = _conv_model(codes, groups, tmp_path / f"conv{k}.onnx")
        jobs.append((path, [np.ones(shape, np.float32)]))
        steps.append(step)
    outputs = run_many_as(target, jobs)
    return [abs(float(out[0].ravel()[0]) - float(codes[0].sum())) / float(step)
            for out, (codes, _), step in zip(outputs, cases, steps, strict=True)]


def _conv_model(codes: np.ndarray, groups: int, path) -> tuple[object, list[int], np.float32]:
    out, cin = codes.shape[0], codes.shape[1] * groups
    step = np.float32(127 * codes[0].size / 128)
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "sx"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(codes.astype(np.int8), "wq"),
             numpy_helper.from_array(np.ones(out, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(out, np.int8), "zw"),
             numpy_helper.from_array(step, "so"), numpy_helper.from_array(np.array(128, np.uint8), "zo")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=groups),
             helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["out"])]
    shape = [1, cin, *codes.shape[2:]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path, shape, step


def _codes(shape: tuple, where: list[tuple]) -> np.ndarray:
    codes = np.zeros(shape, np.float32)
    for index in where:
        codes[index] = 127
    return codes


CASES = {  # name: (weight codes (O, C/g, kh, kw), groups)
    "1x1 channels 0,1 (a pair)": (_codes((1, 4, 1, 1), [(0, 0, 0, 0), (0, 1, 0, 0)]), 1),
    "1x1 channels 1,2 (two pairs)": (_codes((1, 4, 1, 1), [(0, 1, 0, 0), (0, 2, 0, 0)]), 1),
    "3x3, 3 channels: channel 2 at tap 0 and channel 0 at tap 1 (adjacent in HWIO)":
        (_codes((1, 3, 3, 3), [(0, 2, 0, 0), (0, 0, 0, 1)]), 1),
    "3x3, 3 channels: channel 0 at taps 0 and 1 (not adjacent in HWIO)":
        (_codes((1, 3, 3, 3), [(0, 0, 0, 0), (0, 0, 0, 1)]), 1),
    "3x3, 4 channels: channel 3 at tap 0 and channel 0 at tap 1 (pair boundary)":
        (_codes((1, 4, 3, 3), [(0, 3, 0, 0), (0, 0, 0, 1)]), 1),
    "depthwise 3x3, every code 127": (np.full((8, 1, 3, 3), 127, np.float32), 8),
    "grouped 1x1: channels 0,1 of each group": (_codes((2, 4, 1, 1), [(0, 0, 0, 0), (0, 1, 0, 0), (1, 0, 0, 0),
                                                                      (1, 1, 0, 0)]), 2),
}


@needs_avx2
def test_ort_as_avx2_saturates_exactly_where_predicted(tmp_path) -> None:
    errors = {}
    measured = ort_conv_errors(list(CASES.values()), "avx2", tmp_path)
    for (name, (codes, groups)), err in zip(CASES.items(), measured, strict=True):
        rows = reduction_rows(torch.from_numpy(codes), "conv", groups)
        predicted = rows is not None and bool(saturating_pairs(rows).sum() > 0)
        errors[name] = (err, predicted)
    # a saturated pair loses (255 * 254 - 32767) / 255 = 125.5 of the exact 254: far more than one output step
    agrees = {name: (err > 2.0) == predicted for name, (err, predicted) in errors.items()}
    assert agrees == dict.fromkeys(CASES, True), errors
    assert sum(predicted for _, predicted in errors.values()) == 3  # both outcomes are exercised


@needs_vnni
def test_ort_as_vnni_never_saturates(tmp_path) -> None:
    # the cases that saturate as AVX2 are exact here (the all-127 depthwise one clips its output by a step)
    errors = dict(zip(CASES, ort_conv_errors(list(CASES.values()), "vnni", tmp_path), strict=True))
    assert all(err <= 1.0 for err in errors.values()), errors


@pytest.mark.smoke
def test_pair_counting() -> None:
    codes = torch.tensor([[127, 2, -64, -65, 63, 63], [64, 64, 65, -100, 1, 0]])
    assert saturating_pairs(codes).tolist() == [2, 0]
    assert saturating_pairs(codes, limit=126).tolist() == [2, 1]  # the 64 + 64 pair within a margin of 2
    assert reduction_rows(torch.zeros(4, 3, 2, 2), "conv_transpose") is None


def _reference_widen(weight: torch.Tensor, limit: int) -> tuple[int, list[int], torch.Tensor]:
    """widen() written out channel by channel and pair by pair, on the OIHW weight itself: (pairs that could
    overflow at 8 bits, widened channels, each channel's amax)."""
    qmax, amaxes, risky, widened = 127, [], 0, []
    for c, w in enumerate(weight):
        row = w.permute(*range(1, w.dim()), 0).flatten() if w.dim() == 3 else w  # (kh, kw, in): input fastest
        row = torch.cat([row, row.new_zeros(row.numel() % 2)])
        amax = row.abs().max()
        codes = torch.round(row / (amax / qmax)).clamp(-qmax, qmax)
        same_signed = [max(sum(max(float(v), 0.0) for v in p), -sum(min(float(v), 0.0) for v in p))
                       for p in (codes[j:j + 2] for j in range(0, len(codes), 2))]
        over = sum(m > limit for m in same_signed)
        risky += over
        if over:
            widened.append(c)
            pairs = [max(float(p.clamp(min=0).sum()), float(-p.clamp(max=0).sum())) for p in row.view(-1, 2)]
            amax = torch.maximum(amax, torch.tensor(max(pairs), dtype=torch.float32) * qmax / (limit - 1))
        amaxes.append(amax)
    return risky, widened, torch.stack(amaxes)


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (5, 16, 1, 1), (5, 3, 7, 7), (7, 33)])
@pytest.mark.parametrize("limit", [128, 126])
def test_widened_ranges_match_a_channel_by_channel_reference(shape: tuple, limit: int) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + limit)
    weight = torch.randn(shape, generator=gen)
    weight[1] = weight[1].abs() + 0.3  # one channel of same-signed weights: every pair overflows at 8 bits
    weight[2] *= 0.01  # a small channel: its own range is what counts
    alternating = torch.tensor([0.5, -0.5]).repeat(weight[3].numel())[:weight[3].numel()]  # in reduction order
    weight[3] = alternating.view(*shape[2:], shape[1]).movedim(-1, 0)  # no same-signed pair: safe at limit 128
    weight[4] = 0.0  # all zero: nothing to widen
    q = TensorQuantizer(ONNXRUNTIME.weight, constant=True)
    amax = weight.reshape(shape[0], -1).abs().amax(1)
    q._min, q._max = -amax, amax.clone()
    data = widen(q, weight, "conv" if len(shape) == 4 else "linear", 1, limit)
    risky, widened, expected = _reference_widen(weight, limit)
    assert 1 in widened and 4 not in widened and (3 in widened) == (limit < 127)  # |127| alone overflows 126
    assert data["bits"] == 8 and data["saturating_pairs_at_8_bits"] == risky > 0
    assert data["widened_channels"] == len(widened)
    assert torch.equal(q._max, expected) and torch.equal(q._min, -expected)
    assert torch.equal(q._max != amax, torch.isin(torch.arange(shape[0]), torch.tensor(widened)))


class TwoConvs(nn.Module):
    """conv_a's weights saturate at 8 bits (same-signed, large neighbours); conv_b's alternate in sign."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_a = nn.Conv2d(16, 8, 1)
        self.conv_b = nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.conv_a.weight.copy_(0.5 + 0.5 * torch.rand(8, 16, 1, 1, generator=gen))
            signs = torch.tensor([1.0, -1.0]).repeat(4).view(1, 8, 1, 1)
            self.conv_b.weight.copy_(signs * (0.5 + 0.5 * torch.rand(8, 8, 1, 1, generator=gen)) / 8)
            self.conv_a.bias.zero_()
            self.conv_b.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(torch.relu(self.conv_a(x)) / 16)


def _quantize(config: fxquant.QuantConfig | None, data: list[torch.Tensor], path: str, cpu: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(TwoConvs().eval(), data[0], data, backend="onnxruntime", config=config,
                                  progress=False)
        return qmodel, fxquant.export_onnx(qmodel, data[0], path, check_cpu=cpu, check_latency=False)


@pytest.mark.zoo  # two exports checked in ORT under the emulator: about 10 s (the exact tests run AVX2 by default)
@needs_avx2
def test_saturation_aware_weights_in_ort_as_avx2(tmp_path) -> None:
    gen = torch.Generator().manual_seed(1)
    data = [0.7 + 0.3 * torch.rand(4, 16, 6, 6, generator=gen) for _ in range(4)]
    plain = fxquant.QuantConfig(bias_correction=False)  # the widths alone (bias correction would hide part of it)
    qmodel, aware = _quantize(plain, data, tmp_path / "aware.onnx", "avx2")
    layers = fxquant.report_of(qmodel).ptq["weight_bits"].data
    assert layers["conv_a"]["bits"] == 8 and layers["conv_a"]["widened_channels"] == 8
    assert layers["conv_a"]["saturating_pairs_at_8_bits"] == 64  # every pair of every channel
    assert layers["conv_b"] == {"bits": 8, "saturating_pairs_at_8_bits": 0, "channels": 8, "widened_channels": 0,
                                "min_effective_bits": 8.0}
    assert aware.ort_sqnr_db > 35.0  # ORT with every fusion matches the fake-quant model: nothing saturates
    plain8 = fxquant.QuantConfig(weight=ONNXRUNTIME.weight.with_(num_bits=8), bias_correction=False)
    _, eight = _quantize(plain8, data, tmp_path / "eight.onnx", "avx2")
    assert eight.ort_sqnr_db < 15.0  # the same layers with plain 8-bit weights saturate in ORT as AVX2
    seven = fxquant.QuantConfig(weight=ONNXRUNTIME.weight, bias_correction=False)
    qseven, _ = _quantize(seven, data, tmp_path / "seven.onnx")
    x = data[0]
    with torch.no_grad():
        reference = TwoConvs().eval()(x)
        assert fxquant.sqnr(reference, qmodel(x)) > fxquant.sqnr(reference, qseven(x)) + 1.0


class FunctionalConvs(nn.Module):
    """TwoConvs written with F.conv2d on its parameters, then a depthwise F.conv2d (ORT accumulates it in 32 bits)."""

    def __init__(self) -> None:
        super().__init__()
        ref = TwoConvs()
        self.wa, self.ba, self.wb, self.bb = ref.conv_a.weight, ref.conv_a.bias, ref.conv_b.weight, ref.conv_b.bias
        self.wd = nn.Parameter(torch.full((8, 1, 3, 3), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(torch.relu(F.conv2d(x, self.wa, self.ba)) / 16, self.wb, self.bb)
        return F.conv2d(y, self.wd, None, 1, 1, 1, 8)


def test_functional_convs_get_the_weight_bits_their_module_twins_get() -> None:
    """The choice reads the weights, not the module classes: F.conv2d layers get the module layers' widths."""
    data = [0.7 + 0.3 * torch.rand(4, 16, 6, 6, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, functional = (fxquant.quantize(m.eval(), data[0], data, backend="onnxruntime", progress=False)
                              for m in (TwoConvs(), FunctionalConvs()))
    by_module = fxquant.report_of(module).ptq["weight_bits"].data
    report = fxquant.report_of(functional).ptq["weight_bits"]
    assert report.data["conv2d"] == by_module["conv_a"] and report.data["conv2d"]["widened_channels"] == 8
    assert report.data["conv2d_1"] == by_module["conv_b"]
    assert report.data["conv2d_2"] == {"bits": 8, "saturating_pairs_at_8_bits": 0, "widened_channels": 0}
    assert "`conv2d_2`: 8-bit weights (a conv ORT runs with 32-bit accumulation: depthwise)" in report.done


@needs_vnni
@needs_avx2
def test_weights_for_the_vnni_target_are_plain_8_bit_and_right_only_on_vnni(tmp_path) -> None:
    """QuantConfig(target="vnni") gives every layer plain 8-bit weights: ORT on a VNNI/AMX CPU computes them as the
    fake-quant model does, ORT on a pre-VNNI CPU (AVX2) saturates the same model. Undeclared, the widths are safe
    on both (the test above)."""
    gen = torch.Generator().manual_seed(1)
    data = [0.7 + 0.3 * torch.rand(4, 16, 6, 6, generator=gen) for _ in range(4)]
    vnni = fxquant.QuantConfig(target="vnni")
    qmodel, on_vnni = _quantize(vnni, data, tmp_path / "vnni.onnx", "vnni")
    report = fxquant.report_of(qmodel).ptq["weight_bits"]
    assert report.data == {"conv_a": {"bits": 8, "target": "vnni"}, "conv_b": {"bits": 8, "target": "vnni"}}
    plain = fxquant.quantize(TwoConvs().eval(), data[0], data, backend="onnxruntime", progress=False,
                             config=fxquant.QuantConfig(weight=ONNXRUNTIME.weight.with_(num_bits=8)))
    with torch.no_grad():  # exactly the plain 8-bit model: no range widened
        assert torch.equal(qmodel(data[0]), plain(data[0]))
    assert on_vnni.ort_sqnr_db > 35.0
    _, on_avx2 = _quantize(vnni, data, tmp_path / "vnni_on_avx2.onnx", "avx2")
    assert on_avx2.ort_sqnr_db < 15.0
