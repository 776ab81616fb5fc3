"""Transformers: torch.export whole-graph capture, SDPA decomposition, SmoothQuant, and MiniLM accuracy."""

from __future__ import annotations

import copy
import operator
import warnings

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.capture.export import export_trace
from fxquant.capture.trace import propagate_shapes, trace
from fxquant.passes.decompose_sdpa import decompose_sdpa
from fxquant.ptq.smoothquant import smoothquant
from fxquant.quantizer import TensorQuantizer

transformers = pytest.importorskip("transformers")


class _Attention(nn.Module):
    def __init__(self, mask: str, scale: float | None) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.mask, self.scale = mask, scale

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (2, 8)).transpose(1, 2) for p in (self.q, self.k, self.v))
        kw = {"scale": self.scale}
        if self.mask == "bool":
            kw["attn_mask"] = m[:, None, None, :] > 0
        elif self.mask == "float":
            kw["attn_mask"] = (1.0 - m[:, None, None, :]) * -1e4
        elif self.mask == "causal":
            kw["is_causal"] = True
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_decomposition_is_exact(mask: str, scale: float | None) -> None:
    torch.manual_seed(0)
    model = _Attention(mask, scale).eval()
    x, m = torch.randn(2, 7, 16), torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3])
    expected = model(x, m).detach()
    gm = trace(copy.deepcopy(model))
    propagate_shapes(gm, (x, m))
    muls = sum(n.target is operator.mul for n in gm.graph.nodes)  # the float mask's own multiply
    result = decompose_sdpa(gm, (x, m))
    targets = [n.target for n in result.gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets
    assert targets.count(torch.matmul) == 2
    assert targets.count(operator.mul) == muls  # the scale went into the query Linear
    torch.testing.assert_close(result.gm(x, m), expected, atol=1e-5, rtol=0)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _ids(seed: int, length: int = 12, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - seed % 4:] = 0
    mask[1::2, length // 2:] = 0  # every other sequence of a batch is short
    return torch.randint(0, 120, (batch, length), generator=g), mask


def test_export_capture_is_exact_at_other_lengths_and_keeps_model_output() -> None:
    model = _bert()
    gm, why = export_trace(model, (*_ids(0), None))
    assert why is None
    kinds = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds == {"Linear", "LayerNorm", "Embedding"}
    for batch, length in ((1, 12), (1, 30), (3, 20)):  # shapes are exported dynamic; the batch-1 example fixes none
        ids = _ids(1, length, batch)
        out, ref = gm(*ids), model(*ids)
        assert type(out) is type(ref)
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_hf_models_are_captured_whole(arch: str) -> None:
    if arch == "bert":
        model, example = _bert(), _ids(0)
        linears, matmuls = 2 * 6 + 1, 2 * 2
    else:
        torch.manual_seed(0)
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64)
        model, example = transformers.ViTModel(config).eval(), (torch.randn(1, 3, 32, 32),)
        linears, matmuls = 2 * 6 + 1, 2 * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, example, backend="onnxruntime")
    report = fxquant.report_of(prepared)
    assert report.eager == []
    assert any("torch.export" in note for note in report.notes)
    kinds = [e.kind for e in report.quantized]
    assert kinds.count("linear") == linears
    assert kinds.count("matmul") == matmuls


def test_smoothquant_is_exact_in_float_and_reported() -> None:
    model = _bert()
    batches = [_ids(i) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, batches[0], backend="onnxruntime", config=fxquant.QuantConfig())
    for q in prepared.modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("disabled")
    # an outlier channel, as trained LayerNorms have: smoothing must then move it into the weights
    with torch.no_grad():
        prepared.get_submodule("embeddings.LayerNorm").weight[3] = 30.0
        model.embeddings.LayerNorm.weight[3] = 30.0
    before = [prepared(*b).last_hidden_state for b in batches]
    report = smoothquant(prepared, batches)
    assert len(report.done) >= 1
    assert "embeddings.LayerNorm" in report.data["layers"]
    assert report.data["layers"]["embeddings.LayerNorm"]["alpha"] is not None
    assert float(prepared.get_submodule("embeddings.LayerNorm").weight[3]) < 30.0
    for b, ref in zip(batches, before, strict=True):
        torch.testing.assert_close(prepared(*b).last_hidden_state, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tensorrt", marks=pytest.mark.zoo),
                                     pytest.param("onnxruntime_dynamic", marks=pytest.mark.zoo)])
def test_bert_from_one_sentence_calibrates_padded_and_runs_at_any_batch_and_length(backend: str, tmp_path) -> None:
    model = _bert()
    example = _ids(1, 9)  # one sentence, as the first call users make
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, example, backend=backend)
        fxquant.calibrate(prepared, [_ids(s, 16, batch=4) for s in range(2, 6)], progress=False)  # padded, 4 each
        qmodel = fxquant.convert(prepared)
        result = fxquant.export_onnx(qmodel, example, tmp_path / "bert.onnx", check_latency=False)
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input] == \
        [["batch", "input_ids_dim1"]] * 2
    # conditions on the length the capture holds, listed (transformers' own `q_length > 1`: no warning)
    conditions = {p.key: p.value for p in result.model.metadata_props}["fxquant.input_conditions"]
    assert "input_ids.size()[1] <= 64" in conditions and "input_ids.size()[1] > 1 (sdpa_attention.py:" in conditions
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    for batch, length in ((1, 9), (3, 20), (2, 64)):
        ids, mask = _ids(7, length, batch)
        real = mask.bool()
        with torch.no_grad():
            expected, got = model(ids, mask).last_hidden_state[real], qmodel(ids, mask).last_hidden_state
        in_ort = torch.from_numpy(session.run(None, {"input_0": ids.numpy(), "input_1": mask.numpy()})[0])
        assert fxquant.sqnr(expected, got[real]) >= 20.0, (batch, length)  # measured 25-33 dB
        assert fxquant.sqnr(got[real], in_ort[real]) >= 30.0, (batch, length)
    with pytest.raises(fxquant.InputShapeError, match="<= 64"):
        qmodel(*_ids(7, 65))  # past the position embeddings: the capture holds no such length
