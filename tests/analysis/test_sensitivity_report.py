"""The prepare summary: every quantized op with its rule, every float op with its reason, counts per kind."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.cli.torchvision_models import random_torchvision

torch.set_num_threads(1)

RESNET18_COUNTS = {
    "tensorrt": {
        "add": {"quantized": 8, "pass-through": 0, "float": 0},
        "avg_pool": {"quantized": 0, "pass-through": 1, "float": 0},
        "conv": {"quantized": 20, "pass-through": 0, "float": 0},
        "linear": {"quantized": 1, "pass-through": 0, "float": 0},
        "max_pool": {"quantized": 0, "pass-through": 1, "float": 0},
        "relu": {"quantized": 0, "pass-through": 17, "float": 0},
        "reshape": {"quantized": 0, "pass-through": 1, "float": 0},
    },
    "onnxruntime": {
        "add": {"quantized": 8, "pass-through": 0, "float": 0},
        "avg_pool": {"quantized": 1, "pass-through": 0, "float": 0},
        "conv": {"quantized": 20, "pass-through": 0, "float": 0},
        "linear": {"quantized": 1, "pass-through": 0, "float": 0},
        "max_pool": {"quantized": 1, "pass-through": 0, "float": 0},
        "relu": {"quantized": 17, "pass-through": 0, "float": 0},
        "reshape": {"quantized": 1, "pass-through": 0, "float": 0},
    },
}


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return random_torchvision("resnet18")


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_resnet18_summary_counts(resnet18, backend):
    prepared = fxquant.prepare(resnet18, torch.randn(1, 3, 64, 64), backend=backend)
    report = fxquant.report_of(prepared)
    assert report.counts() == RESNET18_COUNTS[backend]
    assert report.as_dict()["counts_by_kind"] == RESNET18_COUNTS[backend]
    assert report.weight_quantizers == 21 and len(report.folded_bn) == 20
    assert report.activation_quantizers == {"tensorrt": 21, "onnxruntime": 31}[backend]
    assert report.traced == [""] and report.eager == [] and report.float_ops == []

    text = report.summary()
    lines = text.splitlines()
    n_quantized = sum(c["quantized"] for c in RESNET18_COUNTS[backend].values())
    assert lines[0] == report.headline()
    assert lines[0].startswith(f"fxquant prepare ({backend}): {n_quantized} ops quantized")
    assert sum(1 for line in lines if line.startswith("  quant  ")) == n_quantized == len(report.quantized)
    rule = {"tensorrt": "weighted_input", "onnxruntime": "weighted_clamp"}[backend]
    assert any(line.split() == ["quant", "layer1_0_conv1", "conv", rule] for line in lines)
    assert any(line.split() == ["conv", "20", "0", "0"] for line in lines)  # the per-kind table
    assert len(report.summary(ops=False).splitlines()) == 2 + len(RESNET18_COUNTS[backend])


class _Mixed(nn.Module):
    """A conv (quantized), a sigmoid gate (float on TensorRT, with its reason) and an excluded linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.erf(y)
        return self.fc(y.mean((2, 3)))


def test_float_ops_are_listed_with_their_reason():
    config = fxquant.QuantConfig(overrides=(fxquant.Override("fc", exclude=True),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(_Mixed().eval(), torch.randn(1, 3, 8, 8), backend="tensorrt", config=config)
    report = fxquant.report_of(prepared)
    floats = {e.node: (e.kind, e.detail) for e in report.float_ops}
    assert floats["fc"] == ("linear", "excluded by Override('fc')")
    assert floats["erf"][0] == "other" and "erf" in floats["erf"][1]
    assert [e.node for e in report.quantized] == ["conv"]
    data = report.as_dict()
    assert data["float"][0].keys() == {"node", "kind", "detail"}
    assert data["counts"]["float"]["linear"] == 1
    text = report.summary()
    assert any(line.split()[:3] == ["float", "fc", "linear"] and line.endswith("excluded by Override('fc')")
               for line in text.splitlines())
