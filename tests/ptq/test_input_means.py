"""Bias correction from input means (``QuantConfig(bias_correction="input_means")``): the correction is exactly
``dW E[x]`` of the calibration inputs, it removes the weight-rounding mean shift it is built for, it pays on a
MobileNet-style CNN trained on the real digits data, and the standalone ``correct_bias`` agrees with calibrate's."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.cli.demo_model import accuracy
from fxquant.metrics import sqnr

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = fxquant.prepare(model, batches[0][:1], backend=backend,
                                       config=fxquant.QuantConfig(weight=W4, bias_correction=method))
            fxquant.calibrate(prepared, batches, progress=False)
        with torch.no_grad():
            results[method] = (sqnr(ref, prepared(x_test)), accuracy(prepared, x_test, y_test))
    (db_plain, acc_plain), (db_means, acc_means) = results[False], results["input_means"]
    assert db_means > db_plain + 3.0, results  # 12.7 -> 17.3 dB (onnxruntime), 12.7 -> 17.1 dB (tensorrt)
    assert acc_means >= acc_plain - 0.5, results
