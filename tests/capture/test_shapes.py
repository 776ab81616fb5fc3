"""Captured models run at the sizes users run: a batch-1 example fixes nothing, a branch on a size is a guard that
raises outside it (never another path's function), and declared dynamic axes reach the ONNX model."""

from __future__ import annotations

import copy
import math
import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

import fxquant
from fxquant.errors import CalibrationDataError, ConfigError, ConfigTypeError, InputShapeError

torch.set_num_threads(1)


class Tokens(nn.Module):
    """A small attention block torch.fx cannot trace (``torch.zeros`` of traced sizes): torch.export captures it."""

    def __init__(self, fixed_length: int | None = None) -> None:
        super().__init__()
        self.inp, self.q, self.k, self.v, self.out = (nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                                      nn.Linear(16, 16), nn.Linear(16, 4))
        self.fixed_length = fixed_length

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.inp(x) + torch.zeros(b, t, 16)
        length = t if self.fixed_length is None else self.fixed_length  # a literal length fixes the capture
        q, k, v = (p(h).reshape(b, length, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(8) + (1.0 - mask[:, None, None, :]) * -1e4
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 16)
        return self.out(torch.relu(ctx))


class Branch(nn.Module):
    """A branch on the sequence length at the root: captured on the example's path only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 6:
            x = torch.relu(self.a(x))
        return self.b(x)


class ShapeCNN(nn.Module):
    """A CNN that reads ``b, c, h, w = x.shape`` and builds a tensor of those sizes (torch.export captures it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = torch.relu(self.conv(x)) + torch.zeros(b, 8 * c // 3, h, w)
        return self.fc(y.reshape(b, 8, h * w).mean(-1))


def _tokens(batch: int, length: int, seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length)
    if pad:
        mask[1::2, length - pad:] = 0.0  # every other sequence padded
    return torch.randn(batch, length, 8, generator=g), mask


def _prepare(model: nn.Module, example: tuple, backend: str = "onnxruntime", **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(model, example, backend=backend, **kw)


def _ort(path: str, inputs: tuple, backend: str = "onnxruntime") -> torch.Tensor:
    """ORT's output; a TensorRT-preset graph at the basic level (its meaning: ORT's int8 fusions of full 8-bit
    weights saturate on x86 CPUs without VNNI, so at the full level the result depends on the CPU)."""
    options = ort.SessionOptions()
    if backend == "tensorrt":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _dims(result: fxquant.ExportResult) -> list[list]:
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input]


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_batch_one_example_runs_at_any_batch_and_length_in_torch_and_ort(backend: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = Tokens().eval()
    prepared = _prepare(model, _tokens(1, 6, 0), backend)  # one sequence, as a first call does
    assert any("torch.export" in note for note in fxquant.report_of(prepared).notes)
    # batches of 4, padded, of the lengths it will run at (softmax ranges depend on the length)
    fxquant.calibrate(prepared, [_tokens(4, n, s, pad=2) for s, n in enumerate((5, 12, 8, 10))], progress=False)
    qmodel = fxquant.convert(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxquant.export_onnx(qmodel, _tokens(1, 6, 0), tmp_path / "tokens.onnx", check_latency=False)
    assert _dims(result) == [["batch", "x_dim1", 8], ["batch", "x_dim1"]]
    for batch, length, pad in ((1, 6, 0), (3, 12, 3), (2, 5, 0)):
        inputs = _tokens(batch, length, 7, pad=pad)
        with torch.no_grad():
            expected, got = model(*inputs), qmodel(*inputs)
        # measured 40-50 dB, 26 at length 5 (a sharper softmax than most calibration rows)
        assert fxquant.sqnr(expected, got) >= 23.0, (batch, length)
        assert fxquant.sqnr(got, _ort(result.path, inputs, backend)) >= 30.0, (batch, length)


def test_traced_cnn_reading_its_shape_exports_a_dynamic_batch_from_a_batch_one_example(tmp_path) -> None:
    torch.manual_seed(0)
    model = ShapeCNN().eval()
    qmodel = fxquant.convert(fxquant.calibrate(_prepare(model, torch.randn(1, 3, 8, 8), "tensorrt"),
                                               [torch.randn(4, 3, 8, 8) for _ in range(3)], progress=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxquant.export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "cnn.onnx", check_latency=False)
    assert not [w for w in caught if "batch" in str(w.message)]  # nothing blames the model for a fixed batch
    assert _dims(result)[0][:2] == ["batch", 3]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), qmodel(x)) >= 25.0
        assert fxquant.sqnr(qmodel(x), _ort(result.path, (x,))) >= 30.0


def test_a_branch_on_a_size_raises_outside_the_captured_path_and_names_the_line(tmp_path) -> None:
    torch.manual_seed(0)
    model = Branch().eval()
    prepared = _prepare(model, torch.randn(1, 8, 8))
    with pytest.raises(CalibrationDataError, match=r"calibration batch 1 .*`x\.size\(\)\[1\] > 6`.*test_shapes\.py:"):
        fxquant.calibrate(prepared, [torch.randn(4, 8, 8), torch.randn(4, 5, 8)], progress=False)
    fxquant.calibrate(prepared, [torch.randn(4, 8, 8), torch.randn(4, 10, 8)], progress=False)
    qmodel = fxquant.convert(prepared)
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        assert fxquant.sqnr(model(x), qmodel(x)) >= 25.0  # the captured path, at another batch and length
    for m in (prepared, qmodel, copy.deepcopy(qmodel)):
        with pytest.raises(InputShapeError, match=r"`x\.size\(\)\[1\] > 6`.*`if x\.shape\[1\] > 6:`.*\[2, 5, 8\]"):
            m(torch.randn(2, 5, 8))  # the other path: never computed silently
    # the ONNX graph checks the condition too: ORT raises outside it, naming it and the line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unchecked to warn about
        result = fxquant.export_onnx(qmodel, x, tmp_path / "branch.onnx", check_latency=False)
    assert _dims(result) == [["batch", "x_dim1", 8]]
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["fxquant.input_conditions"].startswith("x.size()[1] > 6 (test_shapes.py:")
    assert props["fxquant.input_conditions_checked"] == props["fxquant.input_conditions"]
    for size in (7, 12, 30):  # inside it, ORT computes the model
        x = torch.randn(3, size, 8)
        with torch.no_grad():
            assert fxquant.sqnr(qmodel(x), _ort(result.path, (x,))) >= 30.0
    for size in (1, 5, 6):
        with pytest.raises(Exception, match=r"captured for inputs where x\.size\(\)\[1\] > 6 \(test_shapes\.py:"):
            _ort(result.path, (torch.randn(2, size, 8),))
    # TensorRT's graph carries no check (its optimization profile bounds the sizes): the export warns instead
    trt = _prepare(model, torch.randn(1, 8, 8), backend="tensorrt")
    fxquant.calibrate(trt, [torch.randn(4, 8, 8)], progress=False)
    warned = r"`x\.size\(\)\[1\] > 6` \(test_shapes\.py:\d+ .*TensorRT checks no condition"
    with pytest.warns(UserWarning, match=warned):
        result = fxquant.export_onnx(fxquant.convert(trt), x, tmp_path / "branch_trt.onnx", check_latency=False)
    assert not [n for n in result.model.graph.node if n.name.startswith("fxquant_size_check")]


def test_a_size_the_code_fixes_is_a_guard() -> None:
    torch.manual_seed(0)
    prepared = _prepare(Tokens(fixed_length=6).eval(), _tokens(1, 6, 0))
    fxquant.calibrate(prepared, [_tokens(4, 6, s) for s in range(3)], progress=False)
    qmodel = fxquant.convert(prepared)
    assert qmodel(*_tokens(3, 6, 1)).shape == (3, 6, 4)  # the batch stays free
    with pytest.raises(InputShapeError, match=r"`x\.size\(\)\[1\] == 6`"):
        qmodel(*_tokens(3, 7, 1))


def test_declared_axes_reach_onnx_for_a_traced_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    example = torch.randn(1, 5, 8)
    declared = ({0: Dim("batch"), 1: Dim("seq", max=64)},)
    prepared = _prepare(model, example, dynamic_shapes=declared)
    fxquant.calibrate(prepared, [torch.randn(4, 9, 8) for _ in range(3)], progress=False)
    qmodel = fxquant.convert(prepared)
    result = fxquant.export_onnx(qmodel, example, tmp_path / "declared.onnx", check_latency=False)
    assert _dims(result) == [["batch", "seq", 8]]
    x = torch.randn(3, 11, 8)
    with torch.no_grad():
        assert fxquant.sqnr(qmodel(x), _ort(result.path, (x,))) >= 30.0


def test_declared_static_length_on_a_captured_model_is_guarded_and_exported_static(tmp_path) -> None:
    torch.manual_seed(0)
    batch = Dim("batch")
    prepared = _prepare(Tokens().eval(), _tokens(1, 6, 0), dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    fxquant.calibrate(prepared, [_tokens(4, 6, s) for s in range(3)], progress=False)
    qmodel = fxquant.convert(prepared)
    with pytest.raises(InputShapeError, match=r"x\.size\(\)\[1\] == 6"):
        qmodel(*_tokens(2, 9, 1))
    result = fxquant.export_onnx(qmodel, _tokens(1, 6, 0), tmp_path / "static_length.onnx", check_latency=False)
    assert _dims(result) == [["batch", 6, 8], ["batch", 6]]


@pytest.mark.parametrize("declared, error, match", [
    ([{0: Dim("batch")}], ConfigError, "2 example input"),
    (({0: Dim("batch")}, {2: Dim("batch")}), ConfigError, "axis 2"),
    ({"y": {0: Dim("batch")}}, ConfigError, r"\['y'\]"),
    (({0: "batch"}, None), ConfigTypeError, "torch.export.Dim"),
    ("batch", ConfigTypeError, "tuple"),
    (({1: Dim("seq")}, {1: Dim("seq")}), ConfigError, "does not allow the declared dynamic_shapes"),
])
def test_bad_declarations_raise_config_errors(declared, error, match) -> None:
    with pytest.raises(error, match=match):
        _prepare(Tokens(fixed_length=6).eval(), _tokens(1, 6, 0), dynamic_shapes=declared)
