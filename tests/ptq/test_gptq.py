"""GPTQ rounding (``QuantConfig(gptq=True)``): on a MobileNet-style CNN trained on the real
digits data it beats round-to-nearest at the same steps, its codes reach ONNX Runtime exactly, and the rounding
minimizes the layer output error it is built for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.cli.demo_model import accuracy
from fxquant.metrics import sqnr
from fxquant.ptq.gptq import gptq_round
from fxquant.quantizer import TensorQuantizer
from tests.ptq.prepared import calibrated

W4 = fxquant.QuantSpec(num_bits=4, axis=0, narrow_range=True)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_gptq_beats_nearest_rounding_at_w4_on_digits(mobilenet_digits, backend):
    model, (_, _, x_test, y_test), batches = mobilenet_digits
    with torch.no_grad():
        ref = model(x_test)
    nearest = calibrated(model, batches, backend, weight=W4, bias_correction=False)  # rounding alone
    rounded = calibrated(model, batches, backend, weight=W4, gptq=True)
    report = fxquant.report_of(rounded).ptq["gptq"]
    assert len(report.done) == 8 and report.skipped == []  # stem, 3 x (depthwise, pointwise), fc
    assert "gptq" not in fxquant.report_of(nearest).ptq
    assert "bias_correction" not in fxquant.report_of(rounded).ptq  # "auto" leaves GPTQ's codes alone
    with torch.no_grad():
        db_nearest, db_gptq = sqnr(ref, nearest(x_test)), sqnr(ref, rounded(x_test))
        acc_nearest, acc_gptq = accuracy(nearest, x_test, y_test), accuracy(rounded, x_test, y_test)
    assert db_gptq > db_nearest + 2.5, (db_nearest, db_gptq)  # 12.7 -> 16.1-16.2 dB
    assert acc_gptq >= acc_nearest - 0.5 and acc_gptq > accuracy(model, x_test, y_test) - 2.0  # percent


def test_gptq_codes_reach_onnx_runtime_and_survive_recalibration(mobilenet_digits, tmp_path):
    model, (_, _, x_test, _), batches = mobilenet_digits
    prepared = calibrated(model, batches, "onnxruntime", gptq=True)
    weights = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    fxquant.calibrate(prepared, batches[:2], progress=False)  # the codes are fixed: a new calibration keeps them
    assert all(torch.equal(weights[n], p) for n, p in prepared.named_parameters())
    qmodel = fxquant.convert(prepared)
    result = fxquant.export_onnx(qmodel, x_test[:1], tmp_path / "gptq.onnx", check_latency=False)
    assert result.fusion.unfused == []
    assert result.ort_sqnr_db > 35  # saturation-aware codes: ORT's u8s8 kernels compute them exactly on any CPU


def test_gptq_with_adaround_is_a_config_error():
    with pytest.raises(fxquant.ConfigError, match=r"gptq=True\) and adaround both choose the weight rounding"):
        fxquant.QuantConfig(gptq=True, adaround=True)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.ff = nn.Embedding(40, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(torch.relu(self.ff(h)))


def test_a_tied_weight_keeps_nearest_rounding_and_the_embedding():
    torch.manual_seed(0)
    model, ids = _Tied().eval(), torch.randint(0, 40, (8, 12))
    embedding = model.embed.weight.detach().clone()
    prepared = calibrated(model, [ids[:4], ids[4:]], "onnxruntime", gptq=True)
    report = fxquant.report_of(prepared).ptq["gptq"]
    assert report.done == ["`ff`: GPTQ rounding"]
    assert any("`head`: round-to-nearest (its weight is shared" in line for line in report.skipped)
    assert torch.equal(prepared.get_submodule("embed").weight, embedding)  # the shared tensor kept its values
    assert torch.equal(model.embed.weight, embedding)  # and the user's model is untouched


@pytest.mark.parametrize("depthwise", [False, True])
def test_gptq_round_lowers_the_output_error_it_minimizes(depthwise):
    torch.manual_seed(0)
    rows, cols, samples = 16, 9 if depthwise else 48, 2000
    batch = rows if depthwise else 1  # correlated inputs (one shared component), as neighbouring pixels are
    x = torch.randn(batch, samples, 1) + 0.3 * torch.randn(batch, samples, cols)
    h = x.transpose(1, 2) @ x if depthwise else (x[0].T @ x[0])
    weight = torch.randn(rows, cols)
    q = TensorQuantizer(fxquant.QuantSpec(num_bits=4, axis=0, narrow_range=True))
    q.amax = weight.abs().amax(1)
    nearest, rounded = q(weight), gptq_round(weight, h.double(), q, per_row=depthwise)
    steps = q.scale[:, None]
    codes = rounded / steps
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() < 7.001  # on the grid, in range

    def error(w):
        inputs = x if depthwise else x.expand(rows, -1, -1)
        return float((((w - weight)[:, None, :] * inputs).sum(-1) ** 2).mean())

    assert error(rounded) < 0.4 * error(nearest)  # 0.15 and 0.21


def test_encodings_of_gptq_codes_refuse_a_model_gptq_did_not_round(mobilenet_digits, tmp_path):
    # the file holds ranges, not the codes: loaded into a fresh model they would silently round to nearest
    model, _, batches = mobilenet_digits
    rounded = calibrated(model, batches[:2], "onnxruntime", gptq=True)
    fxquant.save_encodings(rounded, tmp_path / "enc.json")
    fresh = fxquant.prepare(model, batches[0][:1], backend="onnxruntime", config=fxquant.QuantConfig(gptq=True))
    with pytest.raises(fxquant.EncodingsError, match=r"gptq chose weight codes that live in the weights, which an "
                                                     r"encodings file does not hold"):
        fxquant.load_encodings(fresh, tmp_path / "enc.json")
    again = calibrated(model, batches[:2], "onnxruntime", gptq=True)  # the same calibration: the same codes
    assert all(torch.equal(a, b) for a, b in zip(rounded.parameters(), again.parameters(), strict=True))


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"),
                         [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
                          ((3, 5), (1, 2), (2, 1), (2, 1)), ((1, 1), (2, 2), (0, 0), (1, 1))])
def test_patches_are_unfolds_columns(kernel, stride, padding, dilation):
    # H is summed from these patches: they must be the conv's own input patches, in its weight's order
    from fxquant.ptq.gptq import _patches

    x = torch.randn(2, 3, 11, 9)
    ours = _patches(x, kernel, stride, padding, dilation)  # (N, C, k, positions)
    ref = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    assert torch.equal(ours.reshape(2, -1, ours.shape[-1]), ref)
