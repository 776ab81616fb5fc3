"""export_onnx() misuse (issue 13 section 2): dtypes, examples, opsets, paths, static batches, files."""

from __future__ import annotations

import copy
import os
import warnings

import onnx
import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import ExportError, FxQuantError
from fxquant.files import atomic_write
from fxquant.lower.onnx_export import export_float_onnx, ort_session, run_ort
from tests.models.tiny import ConvFC as _Net


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).reshape(2, -1)


class _InPlace(_Net):
    def forward(self, x):
        x.mul_(2)
        return super().forward(x)


class _NoOutput(_Net):
    def forward(self, x):
        super().forward(x)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantize(model: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
    torch.manual_seed(0)
    x = _x() if x is None else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.quantize(model.eval(), x, [x], progress=False)


@pytest.fixture(scope="module")
def qmodel() -> nn.Module:
    torch.manual_seed(0)
    return _quantize(_Net())


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_the_opset_asked_for_is_the_opset_written(qmodel, tmp_path, opset):
    result = fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx", opset=opset)
    assert _opset(result.model) == _opset(onnx.load(tmp_path / "m.onnx")) == opset
    assert result.ort_sqnr_db > 40


def test_an_opset_that_cannot_be_written_names_the_op_and_the_lowest_opset(qmodel, tmp_path):
    # before: ONNX's raw adapter text, and "pass opset=18 or later" while 17 works
    with pytest.raises(ExportError, match=r"opset 13 cannot be written for this model: ONNX's version converter "
                                          r"cannot write its Relu \(as of opset 14\) at opset 13\. The lowest opset "
                                          r"it can be written at is 14: pass opset=14 or later"):
        fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx", opset=13)
    assert os.listdir(tmp_path) == []
    assert _opset(fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx", opset=14).model) == 14
    with pytest.raises(fxquant.ConfigError, match=r"opset must be an int from 13 \(per-axis QuantizeLinear\) to \d+"):
        fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx", opset=99)


class _Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_an_op_missing_from_an_older_opset_is_named(tmp_path):
    x = torch.randn(2, 5, 8)
    qmodel = _quantize(_Norm(), x)
    with pytest.raises(ExportError, match=r"opset 16 cannot be written for this model: LayerNormalization does not "
                                          r"exist at opset 16\. The lowest opset it can be written at is 17"):
        fxquant.export_onnx(qmodel, x, tmp_path / "m.onnx", opset=16)
    assert _opset(fxquant.export_onnx(qmodel, x, tmp_path / "m.onnx", opset=17).model) == 17


class _Dropout(_Net):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return super().forward(self.drop(x))


def test_a_model_left_in_train_mode_is_told_to_call_eval(tmp_path):
    # before: export ran, ORT "agreed" at 2.5 dB and the warning blamed float rounding (dropout in the reference)
    qmodel = _quantize(_Dropout()).train()
    with pytest.raises(ExportError, match=r"the model is in training mode \(`the model`, `drop`\): "
                                          r"export traces the forward as it runs now, so dropout would be random.*"
                                          r"call model\.eval\(\) before export_onnx"):
        fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
    assert fxquant.export_onnx(qmodel.eval(), _x(), tmp_path / "m.onnx").ort_sqnr_db > 40


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_float32_models_are_told_to_cast(qmodel, tmp_path, dtype):
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ExportError, match=f"the model's `conv.weight` is {name}; QDQ ONNX export needs a float32 "
                                          "model.*model.float"):
        fxquant.export_onnx(copy.deepcopy(qmodel).to(dtype), _x().to(dtype), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=f"example input 0 is {name}"):
        fxquant.export_onnx(qmodel, _x().to(dtype), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_an_example_of_the_wrong_shape_or_no_samples(qmodel, tmp_path):
    with pytest.raises(ExportError, match=r"failed on the example inputs \(float32\[2, 3, 9, 9\]\): RuntimeError"):
        fxquant.export_onnx(qmodel, torch.randn(2, 3, 9, 9), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"example input 0 has 0 samples \(shape \[0, 3, 8, 8\]\)"):
        fxquant.export_onnx(qmodel, _x()[:0], tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_a_forward_without_output(tmp_path):
    qmodel = _quantize(_NoOutput())
    with pytest.raises(ExportError, match="forward returned NoneType \\(no tensor\\)"):
        fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_bytes_and_bad_paths(qmodel, tmp_path):
    path = os.fsencode(tmp_path / "bytes.onnx")
    result = fxquant.export_onnx(qmodel, _x(), path)
    assert result.path == os.fsdecode(path) and os.path.isfile(result.path) and result.ort_sqnr_db > 40
    with pytest.raises(ExportError, match=r"path must be a str, bytes or os\.PathLike file name, got int"):
        fxquant.export_onnx(qmodel, _x(), 3)


def test_a_model_that_fixes_its_batch_warns(tmp_path):
    qmodel = _quantize(_FixedBatch())
    with pytest.warns(UserWarning, match=r"batch is static \(.*: 2\): the model fixes its batch size"):
        fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx")


def test_a_model_with_a_dynamic_batch_does_not_warn(qmodel, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fxquant.export_onnx(qmodel, _x(), tmp_path / "m.onnx")
    four = torch.randn(4, 3, 8, 8)
    got = run_ort(ort_session(result.path), (four,))[0]
    assert got.shape == (4, 5)
    with torch.no_grad():
        assert fxquant.sqnr(qmodel(four), torch.from_numpy(got)) > 40


def test_an_in_place_forward_leaves_the_example_alone(tmp_path):
    qmodel = _quantize(_InPlace(), _x().clone())
    x = _x()
    result = fxquant.export_onnx(qmodel, x, tmp_path / "m.onnx")
    assert torch.equal(x, _x())
    assert result.ort_sqnr_db > 40  # torch and ORT both saw the example as given


def test_a_failed_write_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    target = tmp_path / "m.onnx"
    with pytest.raises(ZeroDivisionError), atomic_write(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        1 / 0  # noqa: B018
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(ExportError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxquant.export_onnx(_quantize(_Net()), _x(), target, opset=13)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]


def test_load_calib_amax_method_reaches_the_onnx_metadata(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(_Net().eval(), _x(), config=fxquant.QuantConfig(
            activation=fxquant.QuantSpec(calib_method="percentile")))
    fxquant.calibrate(prepared, [_x(i) for i in range(3)], progress=False)
    fxquant.load_calib_amax(prepared, "entropy")
    proto = fxquant.export_onnx(fxquant.convert(prepared), _x(), tmp_path / "m.onnx").model
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["fxquant.calib_method"], meta["fxquant.weight_calib_method"]) == ("entropy", "max")


def test_export_errors_are_fxquant_value_errors():
    assert issubclass(ExportError, FxQuantError) and issubclass(ExportError, ValueError)


def test_the_float_export_honours_the_opset_and_the_example(tmp_path):
    torch.manual_seed(0)
    model, x = _InPlace().eval(), _x()
    path = export_float_onnx(model, x, os.fsencode(tmp_path / "f.onnx"), opset=17)
    assert torch.equal(x, _x()) and _opset(onnx.load(path)) == 17
    got = torch.from_numpy(run_ort(ort_session(path), (x,))[0])
    with torch.no_grad():
        assert fxquant.sqnr(model(x.clone()), got) > 60
