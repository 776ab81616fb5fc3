"""Encodings misuse (issue 13 section 2): files from models with other weights or kernel sizes, hostile JSON."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant import load_encodings, save_encodings
from fxquant.encodings import EncodingsError


class _Net(nn.Module):
    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel, padding=kernel // 2)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _prepare(seed: int = 0, kernel: int = 3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = _Net(kernel).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, fxquant.prepare(model, _x())


def _db(model: nn.Module, prepared: nn.Module) -> float:
    qmodel = fxquant.convert(prepared)
    with torch.no_grad():
        return fxquant.sqnr(model(_x(9)), qmodel(_x(9)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, prepared = _prepare()
    fxquant.calibrate(prepared, [_x(i) for i in range(4)], progress=False)
    path = tmp_path_factory.mktemp("enc") / "enc.json"
    save_encodings(prepared, path)
    return path, _db(model, prepared)


def test_the_same_model_loads_and_matches_the_calibrated_accuracy(saved):
    path, calibrated_db = saved
    model, fresh = _prepare()
    load_encodings(fresh, path)
    assert _db(model, fresh) == pytest.approx(calibrated_db, abs=1e-6) and calibrated_db > 30


@pytest.mark.parametrize(("seed", "kernel"), [(1, 3), (0, 5)])
def test_other_weights_or_another_kernel_size_are_refused(saved, seed, kernel):
    path, _ = saved
    _, other = _prepare(seed, kernel)
    with pytest.raises(EncodingsError) as info:
        load_encodings(other, path)
    message = str(info.value)
    assert "conv.weight_quantizer: the file's weight range" in message
    assert f"shape [8, 3, {kernel}, {kernel}]" in message and "other weights or another kernel size" in message
    assert all(not q.is_calibrated for q in other.modules() if isinstance(q, fxquant.TensorQuantizer)
               and q.spec.amax is None)


def test_deeply_nested_json_is_an_encodings_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    _, prepared = _prepare()
    with pytest.raises(EncodingsError, match="nests JSON too deeply to be an encodings file"):
        load_encodings(prepared, path)


def test_a_binary_file_is_an_encodings_error(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(bytes(range(128, 256)))
    _, prepared = _prepare()
    with pytest.raises(EncodingsError, match="is not valid JSON"):
        load_encodings(prepared, path)


def test_a_missing_file_is_an_encodings_error(tmp_path):
    _, prepared = _prepare()
    with pytest.raises(EncodingsError, match=r"cannot read encodings from .*nope\.json: No such file or directory"):
        load_encodings(prepared, tmp_path / "nope.json")
