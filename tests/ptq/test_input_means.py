"""Bias correction from input means (``QuantConfig(bias_correction="input_means")``): the correction is exactly
``dW E[x]`` of the calibration inputs, it removes the weight-rounding mean shift it is built for, it pays on a
MobileNet-style CNN trained on the real digits data, and the standalone ``correct_bias`` agrees with calibrate's."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.cli.demo_model import accuracy
from fxquant.metrics import sqnr
from tests.ptq.prepared import calibrated

W4 = fxquant.QuantSpec(num_bits=4, axis=0, narrow_range=True)
A16 = fxquant.QuantSpec(num_bits=16, calib_method="max")  # activations all but exact: the weights' shift alone


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.conv1d = nn.Conv1d(8, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.conv(x))))
        z = self.conv1d(y.flatten(2))
        return self.fc(y.mean((2, 3))) + z.mean()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(4, 3, 10, 10, generator=g) * 2 + 0.5 for _ in range(3)]  # a mean far from zero


def _calibrated(model, batches, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, batches[0][:1], backend="tensorrt",
                                   config=fxquant.QuantConfig(weight=W4, activation=A16, **config))
        fxquant.calibrate(prepared, batches, progress=False)
    return prepared


def test_the_correction_is_dw_times_the_input_means_and_cancels_the_mean_shift():
    torch.manual_seed(0)
    model = _Net().eval()
    batches = _batches()
    plain = _calibrated(model, batches)
    corrected = _calibrated(model, batches, bias_correction="input_means")
    report = fxquant.report_of(corrected).ptq["bias_correction"]
    assert [line.split("`")[1] for line in report.done] == ["conv", "dw", "fc"]
    assert any("conv1d" in line and "Conv2d" in line for line in report.skipped)  # a 1-D conv: left, with why
    # the stem's correction, recomputed by hand: dW convolved with each input channel's mean at every position
    x = torch.cat(batches)
    w = plain.get_submodule("conv").weight
    dw = (plain.get_submodule("conv").weight_quantizer(w) - w).detach()
    image = x.mean((0, 2, 3)).reshape(1, 3, 1, 1).expand(1, 3, 10, 10)
    expected = F.conv2d(image.double(), dw.double(), None, 1, 1).mean((0, 2, 3))
    delta = plain.get_submodule("conv").bias - corrected.get_submodule("conv").bias
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-7)
    assert float(expected.abs().max()) > 1e-2  # a real shift, not a rounding residue
    # with 16-bit activations, the stem's mean output error on the calibration data is the weights' alone:
    # the correction cancels it (but for the padded borders' share, which the channel means model exactly)
    with torch.no_grad():
        ref = F.conv2d(x, w, model.conv.bias, 1, 1).mean((0, 2, 3))
        before = plain.get_submodule("conv")(x).mean((0, 2, 3)) - ref
        after = corrected.get_submodule("conv")(x).mean((0, 2, 3)) - ref
    assert float(after.abs().max()) < 0.05 * float(before.abs().max())


def test_standalone_correct_bias_matches_calibrate():
    torch.manual_seed(1)
    model = _Net().eval()
    batches = _batches()
    inside = _calibrated(model, batches, bias_correction="input_means")
    alone = _calibrated(model, batches)
    report = fxquant.correct_bias(alone, batches, method="input_means", progress=False)
    assert len(report.done) == 3
    for name in ("conv", "dw", "fc"):
        torch.testing.assert_close(alone.get_submodule(name).bias, inside.get_submodule(name).bias)
    with pytest.raises(TypeError, match="needs batches"):
        fxquant.correct_bias(alone, None, method="input_means")
    with pytest.raises(fxquant.ConfigError, match="bias_correction must be"):
        fxquant.QuantConfig(bias_correction="means")


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_input_means_pays_at_w4_on_digits(mobilenet_digits, backend):
    model, (_, _, x_test, y_test), batches = mobilenet_digits
    with torch.no_grad():
        ref = model(x_test)
    results = {}
    for method in (False, "input_means"):
        prepared = calibrated(model, batches, backend, weight=W4, bias_correction=method)
        with torch.no_grad():
            results[method] = (sqnr(ref, prepared(x_test)), accuracy(prepared, x_test, y_test))
    (db_plain, acc_plain), (db_means, acc_means) = results[False], results["input_means"]
    assert db_means > db_plain + 3.0, results  # 12.7 -> 17.3 dB (onnxruntime), 12.7 -> 17.1 dB (tensorrt)
    assert acc_means >= acc_plain - 0.5, results


@pytest.mark.parametrize("args", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, groups=4),
                                  dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
                                  dict(kernel_size=4, padding="same", dilation=2), dict(kernel_size=3, padding="valid"),
                                  dict(kernel_size=5, stride=3, padding=4)])
def test_conv_shift_is_the_mean_over_positions_of_dw_on_the_mean_image(args):
    # every conv geometry: the bias moves by conv(mean image, dW) averaged over the output, zero padding included
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 8, **args)).eval()
    batches = [torch.rand(2, 8, 11, 9) * 2 + 0.5 for _ in range(2)]
    plain, corrected = _calibrated(model, batches), _calibrated(model, batches, bias_correction="input_means")
    conv = plain.get_submodule("0")
    dw = (conv.weight_quantizer(conv.weight) - conv.weight).detach().double()
    image = torch.cat(batches).mean((0, 2, 3)).double().reshape(1, 8, 1, 1).expand(1, 8, 11, 9)
    expected = F.conv2d(image, dw, None, conv.stride, conv.padding, conv.dilation, conv.groups).mean((0, 2, 3))
    delta = (conv.bias - corrected.get_submodule("0").bias).double()
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_large_inputs_are_sampled_across_images_and_rows():
    # a batch larger than the sample: about POSITIONS positions per forward, whole rows of several images, other
    # rows on every forward; the mean stays within a few hundredths of the exact one
    from fxquant.ptq.input_means import POSITIONS, InputMeans

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)).eval()
    prepared = fxquant.prepare(model, torch.rand(1, 4, 8, 8), backend="tensorrt")
    watch = InputMeans(prepared)
    layer = watch.layers[0]
    offsets = torch.tensor([0.0, 1.0, -2.0, 5.0]).reshape(1, 4, 1, 1)
    rows = torch.arange(96.0).reshape(1, 1, 96, 1) / 96  # the mean differs from row to row...
    images = torch.arange(16.0).reshape(16, 1, 1, 1) / 16  # ...and from image to image
    x = torch.randn(16, 4, 96, 80) + offsets + rows + images
    sums = []
    for _ in range(6):
        watch.add(layer, x)
        sums.append(watch.sums[layer.name].clone())
    per_forward = watch.counts[layer.name] / 6
    assert POSITIONS <= per_forward <= 2 * POSITIONS
    assert per_forward < x[:, 0].numel() / 8
    assert len({tuple(b - a) for a, b in itertools.pairwise(sums)}) == 5  # other rows each time
    mean = watch.sums[layer.name] / watch.counts[layer.name]
    torch.testing.assert_close(mean.float(), x.mean((0, 2, 3)), atol=0.05, rtol=0)


class _Eager(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        if float(y.sum()) > -1e9:  # data-dependent control flow: torch.fx cannot trace the root
            y = y * 1.0
        return self.fc(y)


@pytest.mark.parametrize(("backend", "config", "expected"), [
    ("onnxruntime", {}, "input_means"), ("tensorrt", {}, None), ("onnxruntime", {"bias_correction": False}, None),
    ("onnxruntime", {"adaround": fxquant.AdaRoundOptions(iterations=2, num_samples=8)}, None),
    ("tensorrt", {"bias_correction": "input_means"}, "input_means")])
def test_auto_is_the_backends_free_correction(backend, config, expected):
    # the default "auto": input means on onnxruntime (exactly the explicit method's biases), nothing on tensorrt
    # or where AdaRound fits the layers' outputs itself
    torch.manual_seed(4)
    model = _Net().eval()
    batches = _batches()
    prepared = calibrated(model, batches, backend, **config)
    report = fxquant.report_of(prepared).ptq.get("bias_correction")
    assert (report.data["method"] if report else None) == expected
    if expected and backend == "onnxruntime":
        explicit = calibrated(model, batches, backend, bias_correction="input_means")
        for name in ("conv", "dw", "fc"):
            assert torch.equal(prepared.get_submodule(name).bias, explicit.get_submodule(name).bias)


def test_auto_leaves_out_a_model_that_is_not_one_graph():
    # an eager root: no ranges pass to tap, so "auto" corrects nothing (and costs nothing) instead of raising
    model = _Eager().eval()
    batches = _batches()
    prepared = calibrated(model, batches, "onnxruntime")
    assert not isinstance(prepared, torch.fx.GraphModule)
    assert "bias_correction" not in fxquant.report_of(prepared).ptq

