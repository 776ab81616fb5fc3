"""Calibrate once, convert elsewhere: state-dict and JSON-encodings round trips, and files that do not fit."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec, TensorQuantizer
from fxquant.encodings import EncodingsError, load_encodings, save_encodings
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.state import get_state

BACKENDS = ["tensorrt", "onnxruntime"]
ENTRY_KEYS = {"scale", "zero_point", "amax", "min", "max", "num_bits", "axis", "symmetric", "unsigned",
              "narrow_range", "calib_method", "qmin", "qmax"}
REDO = "Prepare the same model with the same backend and config"


class _ResNetish(nn.Module):
    """Conv-BN-ReLU stem, a residual block (Conv-BN-ReLU-Conv-BN + skip), pooling and a Linear head."""

    def __init__(self, width: int = 8, extra_conv: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.extra = nn.Conv2d(width, width, 1) if extra_conv else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x)))))
        x = torch.relu(x + y)
        if self.extra is not None:
            x = self.extra(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _model(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = _ResNetish(**kwargs)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding changes the weights
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _data(seed: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


EXAMPLE = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(99))
TEST_X = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(7))


def _prepare(backend: str, model: nn.Module | None = None, config: QuantConfig | None = None) -> torch.fx.GraphModule:
    return fxquant.prepare(_model() if model is None else model, EXAMPLE, backend=backend, config=config)


def _quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _ort_outputs(qmodel: nn.Module, path, backend: str) -> np.ndarray:
    result = fxquant.export_onnx(qmodel, TEST_X[:2], path)
    assert result.ort_sqnr_db > 30.0
    session = ort_session(result.path, level="all" if backend == "onnxruntime" else "basic")
    return run_ort(session, (TEST_X,))[0]


@pytest.fixture(scope="module", params=BACKENDS)
def calibrated(request, tmp_path_factory):
    """A calibrated prepared model of one backend, with its converted outputs and its ONNX outputs in ORT."""
    backend = request.param
    prepared = _prepare(backend)
    fxquant.calibrate(prepared, _data(1), progress=False)
    qmodel = fxquant.convert(prepared)
    with torch.no_grad():
        out = qmodel(TEST_X)
    ort_out = _ort_outputs(qmodel, tmp_path_factory.mktemp(backend) / "original.onnx", backend)
    return backend, prepared, out, ort_out


def _assert_same_ranges(a: nn.Module, b: nn.Module) -> None:
    qa, qb = _quantizers(a), _quantizers(b)
    assert list(qa) == list(qb)
    for name in qa:
        for attr in ("_min", "_max", "scale", "zero_point", "amax"):
            ta, tb = getattr(qa[name], attr), getattr(qb[name], attr)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), (name, attr)


def _assert_converts_and_exports_the_same(loaded: nn.Module, calibrated, tmp_path) -> None:
    backend, _, out, ort_out = calibrated
    qmodel = fxquant.convert(loaded)
    with torch.no_grad():
        got = qmodel(TEST_X)
        reference = _model()(TEST_X)
    assert torch.equal(got, out)
    assert 15.0 < fxquant.sqnr(reference, got) < 60.0  # really quantized, and still close to float
    ort_got = _ort_outputs(qmodel, tmp_path / "loaded.onnx", backend)
    assert np.array_equal(ort_got, ort_out)
    assert fxquant.sqnr(torch.from_numpy(ort_out), torch.from_numpy(ort_got)) == math.inf


# ---- state dict ------------------------------------------------------------------------------------------


def test_state_dict_round_trip_converts_and_exports_identically(calibrated, tmp_path):
    backend, prepared, _, _ = calibrated
    buffer = io.BytesIO()
    torch.save(prepared.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)
    fresh = _prepare(backend)
    assert not any(q.is_calibrated for q in _quantizers(fresh).values())
    with pytest.raises(fxquant.ConversionError, match="have no range yet"):
        fxquant.convert(fresh)
    result = fresh.load_state_dict(state_dict, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(q.is_calibrated for q in _quantizers(fresh).values())
    _assert_same_ranges(prepared, fresh)
    weights = {n: q for n, q in _quantizers(fresh).items() if n.endswith("weight_quantizer")}
    assert len(weights) == 4 and all(q._max.dim() == 1 for q in weights.values())
    assert {q._max.numel() for q in weights.values()} == {8, 5}  # per output channel: convs 8, fc 5
    _assert_converts_and_exports_the_same(fresh, calibrated, tmp_path)


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")  # loading into meta tensors copies nothing
def test_state_dict_range_follows_the_device_the_model_was_moved_to():
    prepared = _prepare("tensorrt")
    fxquant.calibrate(prepared, _data(1), progress=False)
    fresh = _prepare("tensorrt").to("meta")
    fresh.load_state_dict(prepared.state_dict(), strict=True)
    devices = {q._min.device.type for q in _quantizers(fresh).values()}
    assert devices == {"meta"}


def test_state_dict_with_half_a_range_is_rejected():
    prepared = _prepare("tensorrt")
    fxquant.calibrate(prepared, _data(1), progress=False)
    state_dict = prepared.state_dict()
    del state_dict["conv1.weight_quantizer._max"]
    with pytest.raises(RuntimeError, match=r"conv1.weight_quantizer._min and conv1.weight_quantizer._max are a "
                                           r"pair, but the state dict holds only conv1.weight_quantizer._min"):
        _prepare("tensorrt").load_state_dict(state_dict)


def test_state_dict_per_tensor_range_into_a_per_channel_quantizer_is_rejected():
    prepared = _prepare("tensorrt")
    fxquant.calibrate(prepared, _data(1), progress=False)
    state_dict = prepared.state_dict()
    state_dict["conv1.weight_quantizer._min"] = torch.tensor(-1.0)
    state_dict["conv1.weight_quantizer._max"] = torch.tensor(1.0)
    fresh = _prepare("tensorrt")
    with pytest.raises(RuntimeError, match=r"expected two 1-D per-channel tensors .* got shapes \(\) and \(\)"):
        fresh.load_state_dict(state_dict)


# ---- JSON encodings ----------------------------------------------------------------------------------------


def test_encodings_round_trip_converts_and_exports_identically(calibrated, tmp_path):
    backend, prepared, _, _ = calibrated
    path = tmp_path / "enc" / "encodings.json"
    save_encodings(prepared, path)
    fresh = _prepare(backend)
    assert get_state(fresh).stage == "prepared"
    assert load_encodings(fresh, path) is fresh
    assert get_state(fresh).stage == "calibrated"
    _assert_same_ranges(prepared, fresh)
    _assert_converts_and_exports_the_same(fresh, calibrated, tmp_path)


def test_encodings_json_is_readable_and_holds_the_quantizers_numbers(calibrated, tmp_path):
    backend, prepared, _, _ = calibrated
    path = tmp_path / "encodings.json"
    returned = save_encodings(prepared, path)
    text = path.read_text()
    data = json.loads(text)
    assert data == returned
    assert text.startswith('{\n  "fxquant_version"') and '\n    "conv1.weight_quantizer": {\n      "scale": [' in text
    assert data["fxquant_version"] == fxquant.__version__ and data["backend"] == backend
    quantizers = _quantizers(prepared)
    assert list(data["quantizers"]) == list(quantizers)
    for name, q in quantizers.items():
        entry = data["quantizers"][name]
        assert set(entry) == ENTRY_KEYS
        for key in ("scale", "amax", "min", "max"):
            expected = getattr(q, key if key in ("scale", "amax") else f"_{key}")
            assert entry[key] == (expected.tolist() if q.spec.axis is not None else expected.item()), (name, key)
        assert entry["zero_point"] == (q.zero_point.int().tolist() if q.spec.axis is not None
                                       else int(q.zero_point.item()))
        spec = q.spec
        assert (entry["num_bits"], entry["axis"], entry["symmetric"], entry["unsigned"], entry["narrow_range"],
                entry["calib_method"], entry["qmin"], entry["qmax"]) == (
            spec.num_bits, spec.axis, spec.symmetric, spec.unsigned, spec.narrow_range, spec.calib_method,
            spec.qmin, spec.qmax)
    # the input quantizer's numbers under max calibration, computed here from the calibration data
    act = fxquant.BACKENDS[backend].activation.with_(calib_method="max")
    maxed = _prepare(backend, config=QuantConfig(activation=act))
    fxquant.calibrate(maxed, _data(1), progress=False)
    x = torch.cat(_data(1))
    entry = save_encodings(maxed, tmp_path / "max.json")["quantizers"]["x_to_conv1_quantizer"]
    assert entry["min"] == x.min().item() and entry["max"] == x.max().item()
    if backend == "tensorrt":
        assert entry["amax"] == x.abs().max().item() and entry["zero_point"] == 0
        assert entry["scale"] == (x.abs().max() / 127).item() and (entry["qmin"], entry["qmax"]) == (-128, 127)
    else:
        scale = ((x.max() - x.min()) / 255).item()
        assert entry["scale"] == scale and (entry["qmin"], entry["qmax"]) == (0, 255)
        assert entry["zero_point"] == round(-x.min().item() / scale) and 100 < entry["zero_point"] < 155
    weight = data["quantizers"]["fc.weight_quantizer"]
    assert len(weight["scale"]) == 5 and weight["zero_point"] == [0] * 5
    assert weight["axis"] == 0 and weight["narrow_range"] is True


def test_encodings_floats_survive_the_file_bit_for_bit(tmp_path):
    prepared = _prepare("onnxruntime")
    fxquant.calibrate(prepared, _data(2), progress=False)
    data = save_encodings(prepared, tmp_path / "e.json")
    for name, q in _quantizers(prepared).items():
        for key in ("scale", "min", "max"):
            back = torch.tensor(data["quantizers"][name][key], dtype=torch.float32)
            tensor = getattr(q, key if key == "scale" else f"_{key}")
            assert torch.equal(back.reshape(tensor.shape), tensor), (name, key)


def test_encodings_with_scale_amax_are_not_scaled_twice(tmp_path):
    config = QuantConfig(activation=QuantSpec(scale_amax=0.5))
    prepared = _prepare("tensorrt", config=config)
    fxquant.calibrate(prepared, _data(1), progress=False)
    save_encodings(prepared, tmp_path / "e.json")
    x = torch.cat(_data(1))
    assert json.loads((tmp_path / "e.json").read_text())["quantizers"]["x_to_conv1_quantizer"]["amax"] == \
        (x.abs().max() * 0.5).item()
    fresh = load_encodings(_prepare("tensorrt", config=config), tmp_path / "e.json")
    _assert_same_ranges(prepared, fresh)
    with torch.no_grad():
        assert torch.equal(fxquant.convert(fresh)(TEST_X), fxquant.convert(prepared)(TEST_X))


def test_encodings_load_into_a_partly_calibrated_model(tmp_path):
    prepared = _prepare("onnxruntime")
    fxquant.calibrate(prepared, _data(1), progress=False)
    save_encodings(prepared, tmp_path / "e.json")
    other = _prepare("onnxruntime")
    fxquant.calibrate(other, _data(5, n=1), progress=False)  # other data: other ranges
    q = _quantizers(other)
    q["relu_quantizer"]._min = q["relu_quantizer"]._max = None
    q["conv2.weight_quantizer"]._min = q["conv2.weight_quantizer"]._max = None
    assert q["x_to_conv1_quantizer"]._max.item() != _quantizers(prepared)["x_to_conv1_quantizer"]._max.item()
    load_encodings(other, tmp_path / "e.json")
    _assert_same_ranges(prepared, other)
    with torch.no_grad():
        assert torch.equal(fxquant.convert(other)(TEST_X), fxquant.convert(prepared)(TEST_X))


# ---- files that do not fit ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    prepared = _prepare("tensorrt")
    fxquant.calibrate(prepared, _data(1), progress=False)
    path = tmp_path_factory.mktemp("saved") / "trt.json"
    save_encodings(prepared, path)
    return path


def _assert_untouched(model: nn.Module) -> None:
    assert get_state(model).stage == "prepared"
    assert not any(q.is_calibrated for q in _quantizers(model).values())


def test_encodings_of_a_model_with_an_extra_conv_list_the_names(saved):
    bigger = _prepare("tensorrt", _model(extra_conv=True))
    with pytest.raises(EncodingsError) as info:
        load_encodings(bigger, saved)
    message = str(info.value)
    assert "the encodings do not fit this model (10 quantizers; the file has 8)" in message
    assert "missing from the file (2): extra.weight_quantizer, relu_2_to_extra_quantizer" in message
    assert "in the file but not in the model" not in message
    assert message.endswith(REDO + " as the model the encodings were saved from.")
    _assert_untouched(bigger)
    # the other way round: the file has quantizers the model lacks
    prepared = _prepare("tensorrt", _model(extra_conv=True))
    fxquant.calibrate(prepared, _data(1), progress=False)
    data = save_encodings(prepared, saved.parent / "bigger.json")
    with pytest.raises(EncodingsError, match=r"in the file but not in the model \(2\): extra.weight_quantizer, "
                                             r"relu_2_to_extra_quantizer") as info:
        load_encodings(_prepare("tensorrt"), data)
    assert "missing from the file" not in str(info.value)


def test_encodings_of_a_wider_model_name_the_channel_counts(saved):
    wider = _prepare("tensorrt", _model(width=16))
    with pytest.raises(EncodingsError) as info:
        load_encodings(wider, saved)
    message = str(info.value)
    for name in ("conv1", "conv2", "conv3"):
        assert f"{name}.weight_quantizer: min has 8 channel values, the model has 16" in message
    # fc still has 5 output channels, but its weight (5x16, not 5x8) is not the one the file's range came from
    assert "fc.weight_quantizer: the file's weight range" in message and "shape [5, 16]" in message
    assert REDO in message
    _assert_untouched(wider)


def test_encodings_of_another_backend_are_rejected(saved):
    fresh = _prepare("onnxruntime")
    with pytest.raises(EncodingsError, match=r"saved for backend 'tensorrt' but this model was prepared for "
                                             r"'onnxruntime'; prepare it with backend='tensorrt'"):
        load_encodings(fresh, saved)
    _assert_untouched(fresh)


def test_encodings_of_another_config_list_the_spec_differences(saved):
    fresh = _prepare("tensorrt", config=QuantConfig(weight=QuantSpec(num_bits=6, axis=0, narrow_range=True)))
    with pytest.raises(EncodingsError) as info:
        load_encodings(fresh, saved)
    assert ("conv1.weight_quantizer: spec differs (num_bits file=8 model=6; qmin file=-127 model=-31; "
            "qmax file=127 model=31)") in str(info.value)
    assert str(info.value).count("spec differs") == 4 and REDO in str(info.value)
    _assert_untouched(fresh)


def _corrupt(path, name: str, key: str, value: object):
    data = json.loads(path.read_text())
    if value is KeyError:
        del data["quantizers"][name][key]
    elif isinstance(value, tuple):  # (index, number) into a per-channel list
        data["quantizers"][name][key][value[0]] = value[1]
    else:
        data["quantizers"][name][key] = value
    out = path.parent / f"corrupt_{name}_{key}.json"
    out.write_text(json.dumps(data, indent=2))  # json writes NaN as NaN
    return out


@pytest.mark.parametrize(("name", "key", "value", "message"), [
    ("relu_quantizer", "scale", float("nan"), "relu_quantizer: scale holds NaN or infinite values"),
    ("conv2.weight_quantizer", "scale", (3, -0.01), "conv2.weight_quantizer: scale must be > 0, got -0.01"),
    ("conv2.weight_quantizer", "max", (0, float("inf")), "conv2.weight_quantizer: max holds NaN or infinite"),
    ("relu_quantizer", "scale", 0.5, "relu_quantizer: scale does not match min/max (ranges load from min and max"),
    ("relu_quantizer", "min", 1e6, "relu_quantizer: min exceeds max"),
    ("fc.weight_quantizer", "amax", (1, -2.0), "fc.weight_quantizer: amax must be >= 0, got -2.0"),
    ("relu_quantizer", "max", "12", "relu_quantizer: max must be a number, got '12'"),
    ("fc.weight_quantizer", "zero_point", [0.0] * 5, "zero_point must be a list of 5 numbers (one per channel) "
                                                     "(integers)"),
    ("relu_quantizer", "min", KeyError, "relu_quantizer: the entry lacks min"),
])
def test_corrupted_encodings_are_rejected(saved, name, key, value, message):
    fresh = _prepare("tensorrt")
    with pytest.raises(EncodingsError) as info:
        load_encodings(fresh, _corrupt(saved, name, key, value))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, fxquant.CalibrationError)
    assert str(info.value).endswith("save the encodings again with fxquant.save_encodings().")
    _assert_untouched(fresh)


def test_encodings_with_scale_and_zero_point_dropped_load_from_min_max(saved):
    data = json.loads(saved.read_text())
    for entry in data["quantizers"].values():
        for key in ("scale", "zero_point", "amax"):
            del entry[key]
    data["quantizers"]["relu_quantizer"]["max"] = 4.0  # an edited range takes effect
    fresh = load_encodings(_prepare("tensorrt"), data)
    assert fresh.relu_quantizer.scale.item() == pytest.approx(4.0 / 127, rel=1e-7)


def test_bad_files_and_models_give_clear_errors(saved, tmp_path):
    not_json = tmp_path / "broken.json"
    not_json.write_text(saved.read_text()[:200])
    with pytest.raises(EncodingsError, match="is not valid JSON"):
        load_encodings(_prepare("tensorrt"), not_json)
    with pytest.raises(EncodingsError, match="not an fxquant encodings file: it has no 'quantizers' object"):
        load_encodings(_prepare("tensorrt"), {"backend": "tensorrt"})
    with pytest.raises(fxquant.CalibrationError, match=r"quantizer\(s\) have no range yet .* run fxquant.calibrate"):
        save_encodings(_prepare("tensorrt"), tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()
    prepared = _prepare("tensorrt")
    load_encodings(prepared, saved)
    with pytest.raises(EncodingsError, match=r"takes a model returned by fxquant\.prepare.*got a converted model"):
        load_encodings(fxquant.convert(prepared), saved)
    with pytest.raises(EncodingsError, match="got a model that did not come from fxquant"):
        save_encodings(_model(), tmp_path / "plain.json")
