"""Models torch.fx cannot trace whole are quantized without edits: traced where possible, eager elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig
from fxquant.passes.eager_quant import EagerQuantConv2d, EagerQuantLinear
from tests.models.untraceable import (
    BertStyleModel,
    Detect,
    Detector,
    EncoderOutput,
    NeckHead,
    bert_inputs,
    feature_maps,
    randomize_bn,
)

torch.set_num_threads(1)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _quantize(model, example, batches, backend, config=None):
    with pytest.warns(UserWarning, match="run eagerly"):
        prepared = fxquant.prepare(model, example, backend=backend, config=config)
    fxquant.calibrate(prepared, batches, progress=False)
    return prepared, fxquant.convert(prepared)


# ---- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_bert_style_encoder_every_linear_quantized_and_onnx_agrees(backend, tmp_path):
    torch.manual_seed(0)
    model = BertStyleModel().eval()
    snap = _snapshot(model)
    example = bert_inputs()
    prepared, qmodel = _quantize(model, example, [bert_inputs(seed=s) for s in range(1, 5)], backend)

    report = fxquant.report_of(prepared)
    assert {e.node: e.kind for e in report.eager} == {
        "": "BertStyleModel", "embeddings": "Embeddings",
        "encoder.layer.0.attention": "SelfAttention", "encoder.layer.1.attention": "SelfAttention"}
    assert "torch.finfo" in report.eager[0].detail and "untraceable.py:" in report.eager[0].detail
    assert report.traced == ["encoder"]
    assert isinstance(prepared.encoder, torch.fx.GraphModule)
    assert any("output_attentions=False" in note for note in report.notes)

    # every Linear of the model is quantized: 6 traced in the encoder, 6 q/k/v + the pooler by module swap
    linears = {name: m for name, m in prepared.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 13
    assert all(hasattr(m, "weight_quantizer") for m in linears.values()), sorted(linears)
    swapped = sorted(name for name, m in linears.items() if isinstance(m, EagerQuantLinear))
    assert swapped == ["encoder.layer.0.attention.key", "encoder.layer.0.attention.query",
                       "encoder.layer.0.attention.value", "encoder.layer.1.attention.key",
                       "encoder.layer.1.attention.query", "encoder.layer.1.attention.value", "pooler"]
    assert report.counts()["linear"] == {"quantized": 13, "pass-through": 0, "float": 0}
    assert report.weight_quantizers == 13

    with torch.no_grad():
        ref, out = model(*example), qmodel(*example)
    assert isinstance(out, EncoderOutput)
    assert fxquant.sqnr(ref.last_hidden_state, out.last_hidden_state) > 25.0
    assert fxquant.sqnr(ref.pooler_output, out.pooler_output) > 25.0

    result = fxquant.export_onnx(qmodel, example, tmp_path / "bert.onnx")
    assert result.ort_sqnr_db > 30.0
    assert [o.name for o in result.model.graph.output] == ["last_hidden_state", "pooler_output"]
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    producers = {o: n for n in result.model.graph.node for o in n.output}
    weighted = [n for n in result.model.graph.node if n.op_type in ("MatMul", "Gemm")
                and n.input[1] in producers and producers[n.input[1]].op_type in ("DequantizeLinear", "Transpose")]
    dq_weights = [n for n in weighted if producers[n.input[1]].op_type == "DequantizeLinear"
                  or producers[producers[n.input[1]].input[0]].op_type == "DequantizeLinear"]
    integer = [n for n in result.model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    # every Linear reads an int8 weight: through DequantizeLinear, or (onnxruntime, a Linear whose output only
    # reaches float ops) inside MatMulIntegerToFloat
    assert len(dq_weights) + len(integer) == 13
    assert (len(integer) > 0) == (backend == "onnxruntime")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


@pytest.mark.parametrize("backend", [pytest.param("tensorrt", marks=pytest.mark.zoo), "onnxruntime"])
def test_yolo_style_detector(backend, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(Detector())
    snap = _snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    prepared, qmodel = _quantize(model, x, [torch.randn(2, 3, 64, 64) for _ in range(4)], backend)

    report = fxquant.report_of(prepared)
    assert [(e.node, e.kind) for e in report.eager] == [("", "Detector"), ("detect", "Detect")]
    assert "x.abs().sum() == 0" in report.eager[0].detail
    assert sorted(report.traced) == ["backbone", "neck"]
    assert len(report.folded_bn) == 6  # BatchNorm folds inside the traced parts
    assert isinstance(prepared.backbone, torch.fx.GraphModule) and isinstance(prepared.neck, torch.fx.GraphModule)
    assert all(isinstance(m, EagerQuantConv2d) for m in prepared.detect.m)
    stems = 1 if backend == "onnxruntime" else 0  # the backbone's 3 x 3 x 3 stem stays float on onnxruntime
    assert report.counts()["conv"]["quantized"] == 8 - stems  # 6 traced + 2 head convs swapped: every conv
    assert report.weight_quantizers == 8 - stems

    with torch.no_grad():
        ref, out = model(x), qmodel(x)
        raw_ref, raw_out = model.detect.m[0](model.neck(model.backbone(x))[0]), None
    assert fxquant.sqnr(ref, out) > 25.0
    assert raw_ref.shape[1] == 16 and raw_out is None
    with pytest.warns(UserWarning, match=r"data-dependent control flow \(untraceable.py:\d+: `if x.abs"):
        result = fxquant.export_onnx(qmodel, x, tmp_path / "yolo.onnx")
    assert result.ort_sqnr_db > 30.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert not any(isinstance(m, EagerQuantConv2d) for m in model.modules())


@pytest.mark.smoke
def test_traced_root_with_an_eager_submodule_converts_and_exports(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(NeckHead())
    prepared, qmodel = _quantize(model, feature_maps(), [feature_maps(s) for s in range(1, 4)], "onnxruntime")
    report = fxquant.report_of(prepared)
    assert report.traced == [""]
    assert [(e.node, e.kind) for e in report.eager] == [("detect", "Detect")]
    assert "self.grid[i].shape[2:4] != x[i].shape[2:4]" in report.eager[0].detail
    assert isinstance(prepared, torch.fx.GraphModule) and type(prepared.detect) is Detect
    assert all(isinstance(m, EagerQuantConv2d) for m in qmodel.detect.m)
    assert all(type(m.input_quantizer).__name__ == "FrozenQuantizer" for m in qmodel.detect.m)
    with torch.no_grad():
        assert fxquant.sqnr(model(*feature_maps()), qmodel(*feature_maps())) > 25.0
    result = fxquant.export_onnx(qmodel, feature_maps(), tmp_path / "head.onnx")
    assert result.ort_sqnr_db > 30.0
    assert result.op_counts["Conv"] == 3


def test_non_traceable_names_modules_to_run_eagerly():
    model = randomize_bn(NeckHead())
    with pytest.warns(UserWarning, match="run eagerly"):
        prepared = fxquant.prepare(model, feature_maps(), config=QuantConfig(non_traceable=("neck",)))
    report = fxquant.report_of(prepared)
    assert [(e.node, e.detail) for e in report.eager][:1] == [("neck", "named in QuantConfig.non_traceable")]
    assert sorted(report.traced) == ["", "neck.fuse"]  # the module neck calls is traced on its own
    assert isinstance(prepared.neck.fuse, torch.fx.GraphModule)
    assert report.folded_bn == ["neck.fuse.bn"]


def test_strict_raises_instead_of_running_eagerly():
    with pytest.raises(fxquant.TraceError, match=r"could not trace the root module \(Detector\)"):
        fxquant.prepare(Detector().eval(), torch.randn(1, 3, 64, 64), config=QuantConfig(strict=True))
    with pytest.raises(fxquant.TraceError, match=r"could not trace `detect` \(Detect\)"):
        fxquant.prepare(NeckHead().eval(), feature_maps(), config=QuantConfig(strict=True))


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, mask=None, *, double: bool = False):
        y = self.conv(x)
        if mask is not None:
            y = y * mask
        return y * 2 if double else y


def test_arguments_left_out_are_fixed_and_concrete_args_choose_values():
    x = torch.randn(1, 3, 8, 8)
    model = Flagged().eval()
    prepared = fxquant.prepare(model, x)
    assert isinstance(prepared, torch.fx.GraphModule)  # traced whole: the flags are fixed, not branched on
    assert fxquant.report_of(prepared).notes == [
        "the root was traced with mask=None, double=False (the values it was called with); other values raise "
        "at run time"]
    with pytest.raises(AssertionError, match="double has been specialized to have value False"):
        prepared(x, double=True)
    doubled = fxquant.prepare(model, x, config=QuantConfig(concrete_args={"double": True}))
    fxquant.calibrate(doubled, [x], progress=False)
    fxquant.calibrate(prepared, [x], progress=False)
    with torch.no_grad():
        assert torch.allclose(doubled(x, double=True), 2 * prepared(x), atol=1e-5)


def test_leaf_modules_match_full_names_inside_separately_traced_parts():
    model = randomize_bn(Detector())
    with pytest.warns(UserWarning, match="run eagerly"):
        prepared = fxquant.prepare(model, torch.randn(1, 3, 64, 64),
                                   config=QuantConfig(leaf_modules=("backbone.stage2",)))
    floats = {e.node: e.detail for e in fxquant.report_of(prepared).float_ops}
    assert "backbone.stage2" in floats  # kept whole inside the traced backbone: its insides stay float
    assert not hasattr(prepared.get_submodule("backbone.stage2.0.conv"), "weight_quantizer")
    assert hasattr(prepared.get_submodule("backbone.stage1.0.conv"), "weight_quantizer")


def test_bad_config_values():
    with pytest.raises(TypeError, match=r"QuantConfig\.non_traceable must be a tuple of globs"):
        QuantConfig(non_traceable="detect")
    with pytest.raises(TypeError, match=r"QuantConfig\.concrete_args must be a dict"):
        QuantConfig(concrete_args=["flag"])
    with pytest.raises(TypeError, match=r"QuantConfig.leaf_modules holds 3"):
        QuantConfig(leaf_modules=(3,))
