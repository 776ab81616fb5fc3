"""The onnxruntime_dynamic recipe exported: DynamicQuantizeLinear -> MatMulInteger, fused by ORT into
DynamicQuantizeMatMul, agreeing with the fake-quant model."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.errors import ConversionError
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.metrics import sqnr


class Block(nn.Module):
    """A transformer FFN: LayerNorm -> Linear -> GELU -> Linear + residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _quantized(x: torch.Tensor, config: QuantConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = Block().eval()
    batches = [torch.randn_like(x) for _ in range(3)]
    return fxquant.quantize(model, x, batches, backend="onnxruntime_dynamic", config=config, progress=False)


@pytest.mark.parametrize("shape", [(2, 7, 32), (5, 32)])  # 3-D exports MatMul, 2-D Gemm
def test_exported_linears_run_in_integer_kernels_and_agree(tmp_path, shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    q = _quantized(x)
    result = fxquant.export_onnx(q, x, tmp_path / "m.onnx")
    counts = result.op_counts
    assert counts["DynamicQuantizeLinear"] == 2 and counts["MatMulInteger"] == 2
    assert counts["MatMul"] == counts["Gemm"] == counts["DequantizeLinear"] == 0
    assert result.ort_sqnr_db >= 30.0  # export's own check, all ORT optimizations on
    optimized = tmp_path / "opt.onnx"
    session = ort_session(str(result.path), optimized_path=str(optimized), level="all")
    fused = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["DynamicQuantizeMatMul"] == 2
    assert fused["MatMul"] == fused["Gemm"] == fused["MatMulInteger"] == fused["FusedMatMul"] == 0
    other = torch.randn(*shape) * 3  # another batch: its own range, no calibration involved
    with torch.no_grad():
        expected = q(other)
    assert sqnr(expected, torch.from_numpy(run_ort(session, (other,))[0])) >= 30.0


class QKV(nn.Module):
    """Three Linears reading one tensor, as attention's q, k and v projections."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x) * self.k(x), self.v(x)], dim=-1)


def test_linears_sharing_an_input_merge_into_one_integer_gemm(tmp_path):
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 7, 32)
    q = fxquant.quantize(model, x, [x], backend="onnxruntime_dynamic", progress=False)
    result = fxquant.export_onnx(q, x, tmp_path / "m.onnx")
    counts = result.op_counts
    assert counts["DynamicQuantizeLinear"] == counts["MatMulInteger"] == counts["Split"] == 1
    assert result.ort_sqnr_db >= 30.0
    ort_session(str(result.path), optimized_path=str(tmp_path / "opt.onnx"))
    fused = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert fused["DynamicQuantizeMatMul"] == 1 and fused["MatMul"] == fused["Gemm"] == 0


def test_dynamic_recipe_is_close_to_float():
    torch.manual_seed(1)
    x = torch.randn(4, 9, 32)
    q = _quantized(x)
    torch.manual_seed(0)
    with torch.no_grad():
        assert sqnr(Block().eval()(x), q(x)) >= 30.0


def test_per_token_fake_quant_is_refused_at_export_with_the_reason(tmp_path):
    x = torch.randn(2, 7, 32)
    config = QuantConfig(activation=QuantSpec(dynamic=True, symmetric=False, per_token=True))
    q = _quantized(x, config)
    with pytest.raises(ConversionError, match="per_token"):
        fxquant.export_onnx(q, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_linears_are_reported_quantized_and_the_rest_float_with_reasons():
    report = fxquant.report_of(_quantized(torch.randn(2, 7, 32)))
    assert {(e.node, e.detail) for e in report.quantized} == {("up", "linear_dynamic"), ("down", "linear_dynamic")}
    assert {e.kind: "Linear layers" in e.detail for e in report.float_ops} == {
        "layer_norm": True, "gelu": True, "add": True}


def test_encodings_hold_the_weights_and_no_dynamic_range(tmp_path):
    x = torch.randn(2, 7, 32)
    torch.manual_seed(0)
    config = QuantConfig(smoothquant=False)  # SmoothQuant edits the weights in calibrate; a fresh prepare has not
    prepared = fxquant.prepare(Block().eval(), x, backend="onnxruntime_dynamic", config=config)
    fxquant.calibrate(prepared, [x], progress=False)
    saved = fxquant.save_encodings(prepared, tmp_path / "enc.json")
    assert sorted(saved["quantizers"]) == ["down.weight_quantizer", "up.weight_quantizer"]
    torch.manual_seed(0)
    fresh = fxquant.prepare(Block().eval(), x, backend="onnxruntime_dynamic", config=config)
    fxquant.load_encodings(fresh, tmp_path / "enc.json")
    with torch.no_grad():
        assert torch.equal(fresh(x), prepared(x))  # same weight ranges, same per-forward activation ranges
