"""The deployment CPU is declared (QuantConfig.target), never guessed: checked, recorded in the encodings and the
ONNX metadata, refused where it means nothing."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

import fxquant
from fxquant.encodings import EncodingsError
from fxquant.errors import ConfigError


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _prepared(target: str | None, backend: str = "onnxruntime"):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(Small().eval(), x, backend=backend, config=fxquant.QuantConfig(target=target))
        fxquant.calibrate(prepared, [x], progress=False)
    return prepared, x


def test_an_unknown_target_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown CPU target.*'vnni'.*'avx2'"):
        fxquant.QuantConfig(target="avx512")


def test_a_target_with_the_tensorrt_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="tensorrt backend does not deploy to"):
        fxquant.prepare(Small().eval(), torch.randn(1, 3, 8, 8), backend="tensorrt",
                        config=fxquant.QuantConfig(target="vnni"))


@pytest.mark.parametrize(("target", "recorded"), [("vnni", "vnni"), ("avx2", "avx2"), (None, "vnni,avx2")])
def test_the_onnx_metadata_records_the_target(tmp_path, target, recorded) -> None:
    prepared, x = _prepared(target)
    result = fxquant.export_onnx(fxquant.convert(prepared), x, tmp_path / "m.onnx", check_latency=False)
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert meta["fxquant.target"] == recorded
    bits = {layer: d["bits"] for layer, d in fxquant.report_of(prepared).ptq["weight_bits"].data.items()}
    assert bits == {"conv": 8, "head": 8}


def test_encodings_record_the_target_and_refuse_another(tmp_path) -> None:
    prepared, _ = _prepared("vnni")
    data = fxquant.save_encodings(prepared, tmp_path / "enc.json")
    assert data["target"] == "vnni"
    same, _ = _prepared("vnni")
    fxquant.load_encodings(same, tmp_path / "enc.json")  # the same target loads
    other, _ = _prepared(None)
    with pytest.raises(EncodingsError, match=r"saved for CPU target 'vnni'.*QuantConfig\(target='vnni'\)"):
        fxquant.load_encodings(other, tmp_path / "enc.json")
