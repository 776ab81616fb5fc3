"""Models torch.fx cannot trace whole are quantized without edits: traced where possible, eager elsewhere."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import QuantConfig
from fxquant.eager_quant import EagerQuantConv2d, EagerQuantLinear

torch.set_num_threads(1)


# ---- a BERT-style encoder, written the way Hugging Face writes them -----------------------------------------
@dataclass
class EncoderOutput:  # ModelOutput-like
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_len: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_len).expand((1, -1)), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask=None, *, output_attentions: bool = False):
        b, s, _ = hidden_states.size()
        q = self.query(hidden_states).view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        k = self.key(hidden_states).view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        v = self.value(hidden_states).view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # torch.fx cannot branch on a traced dtype
                attention_mask = attention_mask.logical_not() * torch.finfo(scores.dtype).min
            scores = scores + attention_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2).contiguous()
        context = context.view(b, s, self.num_attention_heads * self.attention_head_size)
        return (context, probs) if output_attentions else (context,)


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attention_output = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, inter)
        self.output = nn.Linear(inter, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, hidden_states, attention_mask=None, output_attentions: bool = False):
        outputs = self.attention(hidden_states, attention_mask, output_attentions=output_attentions)
        h = self.ln1(hidden_states + self.attention_output(outputs[0]))
        h = self.ln2(h + self.output(F.gelu(self.intermediate(h))))
        return (h,) + outputs[1:]  # noqa: RUF005 (as Hugging Face writes it)


class Encoder(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(hidden, heads, inter) for _ in range(layers)])

    def forward(self, hidden_states, attention_mask=None, *, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True):
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layer:
            if output_hidden_states:
                all_hidden = (*all_hidden, hidden_states)
            outputs = layer(hidden_states, attention_mask, output_attentions)
            hidden_states = outputs[0]
            if output_attentions:
                all_attn = (*all_attn, outputs[1])
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden, all_attn) if v is not None)
        return {"last_hidden_state": hidden_states, "hidden_states": all_hidden, "attentions": all_attn}


class BertStyleModel(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, inter: int = 64, layers: int = 2,
                 max_len: int = 16) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, hidden, max_len)
        self.encoder = Encoder(hidden, heads, inter, layers)
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None, *, output_attentions: bool = False,
                output_hidden_states: bool = False):
        batch_size, seq_length = input_ids.size()
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_length)
        dtype = self.pooler.weight.dtype
        extended = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        h = self.embeddings(input_ids)
        enc = self.encoder(h, extended, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states)
        sequence_output = enc["last_hidden_state"]
        pooled = torch.tanh(self.pooler(sequence_output[:, 0]))
        if output_hidden_states and sequence_output.abs().sum() > 0:  # a data-dependent branch at the root
            pooled = pooled * 1.0
        return EncoderOutput(sequence_output, pooled, enc["hidden_states"], enc["attentions"])


def _bert_inputs(batch: int = 4, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    mask[:, seq - 3:] = 0.0  # padding
    return ids, mask


# ---- a YOLO-style detector -------------------------------------------------------------------------------
class ConvBnSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnSiLU(3, 8, 3, 2)
        self.stage1 = nn.Sequential(ConvBnSiLU(8, 16, 3, 2), ConvBnSiLU(16, 16))
        self.stage2 = nn.Sequential(ConvBnSiLU(16, 32, 3, 2), ConvBnSiLU(32, 32))

    def forward(self, x):
        p3 = self.stage1(self.stem(x))
        p4 = self.stage2(p3)
        return [p3, p4]


class Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.fuse = ConvBnSiLU(48, 16, 1)

    def forward(self, feats):
        p3, p4 = feats
        return [self.fuse(torch.cat([p3, self.up(p4)], 1)), p4]


class Detect(nn.Module):
    """YOLOv5's head: per-level 1x1 convs, anchor grids cached across calls, decoding only at inference."""

    def __init__(self, nc: int = 3, channels: tuple[int, ...] = (16, 32), strides: tuple[float, ...] = (4.0, 8.0)):
        super().__init__()
        self.nc, self.no, self.na, self.nl = nc, nc + 5, 2, len(channels)
        self.stride = strides
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 4.0], [4.0, 2.0]]]))

    def forward(self, x: list[torch.Tensor]):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:  # the cache: torch.fx cannot branch on shapes
                    yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
                    self.grid[i] = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()
                y = x[i].sigmoid()
                xy = (y[..., 0:2] * 2 - 0.5 + self.grid[i]) * self.stride[i]
                wh = (y[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, self.na, 1, 1, 2)
                z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        return x if self.training else torch.cat(z, 1)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.detect = Detect()

    def forward(self, x, augment: bool = False):
        if x.abs().sum() == 0:  # data-dependent: an all-black frame has no detections
            return torch.zeros(x.shape[0], 0, self.detect.no)
        feats = self.neck(self.backbone(x))
        return self.detect(feats)


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


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
    example = _bert_inputs()
    prepared, qmodel = _quantize(model, example, [_bert_inputs(seed=s) for s in range(1, 5)], backend)

    report = fxquant.report_of(prepared)
    assert {e.node: e.kind for e in report.eager} == {
        "": "BertStyleModel", "embeddings": "Embeddings",
        "encoder.layer.0.attention": "SelfAttention", "encoder.layer.1.attention": "SelfAttention"}
    assert "torch.finfo" in report.eager[0].detail and "test_untraceable.py:" in report.eager[0].detail
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
    producers = {o: n for n in result.model.graph.node for o in n.output}
    weighted = [n for n in result.model.graph.node if n.op_type in ("MatMul", "Gemm")
                and n.input[1] in producers and producers[n.input[1]].op_type in ("DequantizeLinear", "Transpose")]
    dq_weights = [n for n in weighted if producers[n.input[1]].op_type == "DequantizeLinear"
                  or producers[producers[n.input[1]].input[0]].op_type == "DequantizeLinear"]
    assert len(dq_weights) == 13  # every Linear reads an int8 weight through DequantizeLinear
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_yolo_style_detector(backend, tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(Detector())
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
    assert report.counts()["conv"]["quantized"] == 8  # 6 traced + 2 head convs swapped: every conv
    assert report.weight_quantizers == 8

    with torch.no_grad():
        ref, out = model(x), qmodel(x)
        raw_ref, raw_out = model.detect.m[0](model.neck(model.backbone(x))[0]), None
    assert fxquant.sqnr(ref, out) > 25.0
    assert raw_ref.shape[1] == 16 and raw_out is None
    with pytest.warns(UserWarning, match=r"data-dependent control flow \(test_untraceable.py:\d+: `if x.abs"):
        result = fxquant.export_onnx(qmodel, x, tmp_path / "yolo.onnx")
    assert result.ort_sqnr_db > 30.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert not any(isinstance(m, EagerQuantConv2d) for m in model.modules())


class NeckHead(nn.Module):
    """Traceable at the root; its Detect head is not."""

    def __init__(self) -> None:
        super().__init__()
        self.neck = Neck()
        self.detect = Detect()

    def forward(self, p3, p4):
        return self.detect(self.neck([p3, p4]))


def _feats(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 32, 8, 8, generator=g)


def test_traced_root_with_an_eager_submodule_converts_and_exports(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(NeckHead())
    prepared, qmodel = _quantize(model, _feats(), [_feats(s) for s in range(1, 4)], "onnxruntime")
    report = fxquant.report_of(prepared)
    assert report.traced == [""]
    assert [(e.node, e.kind) for e in report.eager] == [("detect", "Detect")]
    assert "self.grid[i].shape[2:4] != x[i].shape[2:4]" in report.eager[0].detail
    assert isinstance(prepared, torch.fx.GraphModule) and type(prepared.detect) is Detect
    assert all(isinstance(m, EagerQuantConv2d) for m in qmodel.detect.m)
    assert all(type(m.input_quantizer).__name__ == "FrozenQuantizer" for m in qmodel.detect.m)
    with torch.no_grad():
        assert fxquant.sqnr(model(*_feats()), qmodel(*_feats())) > 25.0
    result = fxquant.export_onnx(qmodel, _feats(), tmp_path / "head.onnx")
    assert result.ort_sqnr_db > 30.0
    assert result.op_counts["Conv"] == 3


def test_non_traceable_names_modules_to_run_eagerly():
    model = _randomize_bn(NeckHead())
    with pytest.warns(UserWarning, match="run eagerly"):
        prepared = fxquant.prepare(model, _feats(), config=QuantConfig(non_traceable=("neck",)))
    report = fxquant.report_of(prepared)
    assert [(e.node, e.detail) for e in report.eager][:1] == [("neck", "named in QuantConfig.non_traceable")]
    assert sorted(report.traced) == ["", "neck.fuse"]  # the module neck calls is traced on its own
    assert isinstance(prepared.neck.fuse, torch.fx.GraphModule)
    assert report.folded_bn == ["neck.fuse.bn"]


def test_strict_raises_instead_of_running_eagerly():
    with pytest.raises(fxquant.TraceError, match=r"could not trace the root module \(Detector\)"):
        fxquant.prepare(Detector().eval(), torch.randn(1, 3, 64, 64), config=QuantConfig(strict=True))
    with pytest.raises(fxquant.TraceError, match=r"could not trace `detect` \(Detect\)"):
        fxquant.prepare(NeckHead().eval(), _feats(), config=QuantConfig(strict=True))


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
    model = _randomize_bn(Detector())
    with pytest.warns(UserWarning, match="run eagerly"):
        prepared = fxquant.prepare(model, torch.randn(1, 3, 64, 64),
                                   config=QuantConfig(leaf_modules=("backbone.stage2",)))
    floats = {e.node: e.detail for e in fxquant.report_of(prepared).float_ops}
    assert "backbone.stage2" in floats  # kept whole inside the traced backbone: its insides stay float
    assert not hasattr(prepared.get_submodule("backbone.stage2.0.conv"), "weight_quantizer")
    assert hasattr(prepared.get_submodule("backbone.stage1.0.conv"), "weight_quantizer")


def test_bad_config_values():
    with pytest.raises(TypeError, match="QuantConfig.non_traceable must be a tuple of globs"):
        QuantConfig(non_traceable="detect")
    with pytest.raises(TypeError, match="QuantConfig.concrete_args must be a dict"):
        QuantConfig(concrete_args=["flag"])
    with pytest.raises(TypeError, match=r"QuantConfig.leaf_modules holds 3"):
        QuantConfig(leaf_modules=(3,))
