"""Bad inputs give one clear error of the right type, say what to do, and never touch the user's model."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Gated()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, type(m), m.training) for name, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, snap) -> None:
    state, modules = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [(name, type(m), m.training) for name, m in model.named_modules()] == modules


def _x(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def net_and_snapshot():
    torch.manual_seed(0)
    model = _Net().eval()
    return model, _snapshot(model)


@pytest.fixture
def prepared_net(net_and_snapshot):
    model, snap = net_and_snapshot
    return fxquant.prepare(model, _x()), model, snap


# ---- prepare ----------------------------------------------------------------------------------------------


def test_unknown_backend_lists_valid_backends(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(ValueError) as info:
        fxquant.prepare(model, _x(), backend="tflite")
    msg = str(info.value)
    assert "unknown backend 'tflite'" in msg
    assert "'onnxruntime'" in msg and "'tensorrt'" in msg
    _assert_unchanged(model, snap)


def test_config_must_be_quant_config(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(TypeError, match="config must be a QuantConfig, got dict"):
        fxquant.prepare(model, _x(), config={"fold_bn": False})
    _assert_unchanged(model, snap)


def test_prepare_rejects_non_module():
    with pytest.raises(TypeError, match=r"prepare\(\) takes an nn.Module, got function"):
        fxquant.prepare(lambda x: x, _x())


def test_prepare_rejects_integer_code_specs(net_and_snapshot):
    model, snap = net_and_snapshot
    config = QuantConfig(activation=fxquant.QuantSpec(fake_quant=False))
    with pytest.raises(ValueError, match="must have fake_quant=True"):
        fxquant.prepare(model, _x(), config=config)
    _assert_unchanged(model, snap)


def test_example_inputs_with_wrong_channel_count(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(fxquant.ExampleInputError) as info:
        fxquant.prepare(model, _x(channels=5))
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "float32[2, 5, 8, 8]" in msg  # the input that was given
    assert "at `conv` (Conv2d)" in msg  # where it failed
    assert "expected input[2, 5, 8, 8] to have 3 channels" in msg  # torch's own reason, not ShapeProp's wrapper
    assert "ShapeProp" not in msg
    assert "Pass inputs of the shape and dtype the model's forward expects" in msg
    _assert_unchanged(model, snap)


def test_example_inputs_failure_prints_no_traceback(net_and_snapshot, capfd):
    model, _ = net_and_snapshot
    with pytest.raises(fxquant.ExampleInputError):
        fxquant.prepare(model, _x(channels=5))
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out


def test_too_many_example_inputs(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(fxquant.ExampleInputError, match=r"forward takes 1 input\(s\) but 2 example inputs"):
        fxquant.prepare(model, (_x(), _x()))
    _assert_unchanged(model, snap)


def test_example_inputs_of_wrong_type(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple of tensors, got dict"):
        fxquant.prepare(model, {"x": _x()})
    _assert_unchanged(model, snap)


def test_untraceable_submodule_names_path_line_and_leaf_modules():
    model = _Untraceable().eval()
    snap = _snapshot(model)
    with pytest.raises(fxquant.TraceError) as info:
        fxquant.prepare(model, _x(), config=QuantConfig(strict=True))
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "could not trace `block` (_Gated)" in msg
    assert "test_errors.py:" in msg
    assert "`if x.sum() > 0:`" in msg
    assert "QuantConfig(leaf_modules=('block',))" in msg
    _assert_unchanged(model, snap)

    with pytest.warns(UserWarning, match=r"1 op\(s\) stay float:\n  block \(other\)"):
        prepared = fxquant.prepare(model, _x(), config=QuantConfig(leaf_modules=("block",)))
    report = fxquant.report_of(prepared)
    assert [e.node for e in report.float_ops] == ["block"]
    assert sorted(e.node for e in report.quantized) == ["head", "stem"]
    assert isinstance(prepared.block, _Gated)
    _assert_unchanged(model, snap)


def test_untraceable_nested_submodule_is_named_by_its_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), _Gated()))
    with pytest.raises(fxquant.TraceError, match=r"could not trace `1\.1` \(_Gated\)") as info:
        fxquant.prepare(model, _x(), config=QuantConfig(strict=True))
    assert "QuantConfig(leaf_modules=('1.1',))" in str(info.value)


def test_untraceable_root_module_does_not_suggest_making_the_root_a_leaf():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            if y.mean() > 0:
                y = y * 2
            return y

    model = Root().eval()
    snap = _snapshot(model)
    with pytest.raises(fxquant.TraceError) as info:
        fxquant.prepare(model, _x(), config=QuantConfig(strict=True))
    msg = str(info.value)
    assert "could not trace the root module (Root)" in msg
    assert "`if y.mean() > 0:`" in msg
    assert "leaf_modules=('Root',)" not in msg
    assert "move that code into a submodule" in msg
    _assert_unchanged(model, snap)


def test_prepare_keeps_user_model_in_training_mode():
    torch.manual_seed(0)
    model = _Net().train()
    snap = _snapshot(model)
    prepared = fxquant.prepare(model, _x())
    assert model.training is True
    assert all(m.training for m in model.modules())
    assert isinstance(model.bn, nn.BatchNorm2d)
    _assert_unchanged(model, snap)  # running stats untouched: prepare ran a copy in eval mode
    assert fxquant.report_of(prepared).folded_bn == ["bn"]


# ---- calibrate --------------------------------------------------------------------------------------------


def test_convert_before_calibrate(prepared_net):
    prepared, model, snap = prepared_net
    with pytest.raises(fxquant.ConversionError) as info:
        fxquant.convert(prepared)
    msg = str(info.value)
    names = [n for n, m in prepared.named_modules() if isinstance(m, fxquant.TensorQuantizer)]
    assert names and all(f"{n}" in msg for n in names[:8])
    assert f"{len(names)} quantizer(s) have no range yet" in msg
    assert "run fxquant.calibrate(prepared, batches) before convert()" in msg
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calibration_batch_names_the_batch(prepared_net, bad):
    prepared, model, snap = prepared_net
    poisoned = _x().clone()
    poisoned[1, 2, 3, 4] = bad
    with pytest.raises(fxquant.CalibrationError) as info:
        fxquant.calibrate(prepared, [_x(), _x(), poisoned], progress=False)
    msg = str(info.value)
    assert "calibration batch 2 contains NaN or Inf values" in msg
    assert "clean the data" in msg
    # the failed calibration left no range behind and the quantizers back in quant mode
    assert all(q.mode == "quant" for q in prepared.modules() if isinstance(q, fxquant.TensorQuantizer))
    assert prepared.training is False
    with pytest.raises(fxquant.ConversionError, match="have no range yet"):
        fxquant.convert(prepared)
    _assert_unchanged(model, snap)


def test_model_producing_nan_names_the_quantizer():
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    prepared = fxquant.prepare(model, _x())
    with pytest.raises(fxquant.CalibrationError) as info:
        fxquant.calibrate(prepared, [_x()], progress=False)
    msg = str(info.value)
    assert "quantizer `fc.weight_quantizer`" in msg
    assert "calibration produced a NaN or infinite range" in msg


def test_non_finite_batch_in_a_tuple_batch(prepared_net):
    prepared, _, _ = prepared_net
    bad = _x().clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxquant.CalibrationError, match="calibration batch 0 contains NaN"):
        fxquant.calibrate(prepared, [(bad,)], progress=False)


def test_empty_calibration_iterable(prepared_net):
    prepared, model, snap = prepared_net
    with pytest.raises(fxquant.CalibrationError, match="the calibration iterable was empty; pass at least one batch"):
        fxquant.calibrate(prepared, [], progress=False)
    with pytest.raises(fxquant.CalibrationError, match="was empty"):
        fxquant.calibrate(prepared, iter(()), progress=False)
    _assert_unchanged(model, snap)


def test_calibrate_plain_module(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(fxquant.CalibrationError) as info:
        fxquant.calibrate(model, [_x()], progress=False)
    assert "this model has no fxquant quantizers" in str(info.value)
    assert "call fxquant.prepare(model, example_inputs)" in str(info.value)
    _assert_unchanged(model, snap)


def test_calibrate_single_tensor_instead_of_batches(prepared_net):
    prepared, _, _ = prepared_net
    with pytest.raises(TypeError, match=r"not a single tensor; wrap it: \[tensor\]"):
        fxquant.calibrate(prepared, _x(), progress=False)


@pytest.mark.smoke
def test_convert_twice(prepared_net):
    prepared, _, _ = prepared_net
    fxquant.calibrate(prepared, [_x()], progress=False)
    converted = fxquant.convert(prepared)
    with pytest.raises(fxquant.ConversionError, match="already converted"):
        fxquant.convert(converted)
    with pytest.raises(fxquant.CalibrationError):
        fxquant.calibrate(converted, [_x()], progress=False)


def test_calibrate_converted_model_says_it_is_converted(prepared_net):
    prepared, _, _ = prepared_net
    fxquant.calibrate(prepared, [_x()], progress=False)
    converted = fxquant.convert(prepared)
    with pytest.raises(fxquant.CalibrationError, match="calibrate the prepared model before convert"):
        fxquant.calibrate(converted, [_x()], progress=False)


# ---- convert / export / report ----------------------------------------------------------------------------


def test_convert_plain_module(net_and_snapshot):
    model, snap = net_and_snapshot
    with pytest.raises(fxquant.ConversionError, match=r"convert\(\) takes the model returned by fxquant.prepare"):
        fxquant.convert(model)
    _assert_unchanged(model, snap)


def test_export_onnx_of_prepared_model(prepared_net, tmp_path):
    prepared, model, snap = prepared_net
    with pytest.raises(fxquant.ConversionError) as info:
        fxquant.export_onnx(prepared, _x(), tmp_path / "m.onnx")
    msg = str(info.value)
    assert "export_onnx() takes the model returned by fxquant.convert() or fxquant.quantize()" in msg
    assert "never converted" in msg
    assert not (tmp_path / "m.onnx").exists()
    _assert_unchanged(model, snap)


def test_export_onnx_of_plain_module(net_and_snapshot, tmp_path):
    model, snap = net_and_snapshot
    with pytest.raises(fxquant.ConversionError, match="did not come from fxquant"):
        fxquant.export_onnx(model, _x(), tmp_path / "m.onnx")
    _assert_unchanged(model, snap)


def test_report_of_plain_module(net_and_snapshot):
    model, _ = net_and_snapshot
    with pytest.raises(TypeError, match=r"report_of\(\) takes a model returned by fxquant"):
        fxquant.report_of(model)


def test_error_types_are_standard_exception_subclasses():
    assert issubclass(fxquant.TraceError, RuntimeError)
    assert issubclass(fxquant.PassError, RuntimeError)
    assert issubclass(fxquant.CalibrationError, RuntimeError)
    assert issubclass(fxquant.ConversionError, RuntimeError)
    assert issubclass(fxquant.ExampleInputError, ValueError)
    for exc in (fxquant.TraceError, fxquant.PassError, fxquant.CalibrationError, fxquant.ConversionError):
        assert issubclass(exc, fxquant.FxQuantError)
