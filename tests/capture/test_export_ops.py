"""ATen ops that torch.export capture maps to torch-level functions keep their meaning (issue 21 section 3):
``torch.sub(a, b, alpha=2)`` and ``torch.add(..., alpha=...)`` keep their keyword, where Python's operators take
none (before: "the model failed on the example inputs" from prepare, blaming the user's example)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.quantizer import TensorQuantizer


class Alpha(nn.Module):
    """Untraceable by torch.fx (``int()`` of a shape), so captured with torch.export; subtracts and adds with
    alpha, as loss-like or residual-scaling code does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        channels = int(x.shape[1])  # torch.fx cannot trace int() of a shape
        y = torch.sub(self.a(x), self.b(x), alpha=2)
        return self.head(torch.add(y, torch.relu(y), alpha=0.5)) * channels


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_alpha_survives_torch_export_capture(backend, tmp_path):
    torch.manual_seed(0)
    model, x = Alpha().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, x, backend=backend)
    assert any("captured whole with torch.export" in n for n in fxquant.report_of(prepared).notes)
    twin = copy.deepcopy(prepared)
    for q in twin.modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("disabled")
    with torch.no_grad():
        assert fxquant.sqnr(model(x), twin(x)) > 100  # the float function, alpha included
    fxquant.calibrate(prepared, [x, torch.randn(2, 3, 8, 8)], progress=False)
    qmodel = fxquant.convert(prepared)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), qmodel(x)) > 25
    assert fxquant.export_onnx(qmodel, x, tmp_path / "m.onnx", check_latency=False).ort_sqnr_db > 30
