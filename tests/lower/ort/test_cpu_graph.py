"""ORT CPU export passes: a BERT exported by the onnxruntime_dynamic recipe runs in ORT with no float op beyond
the fp32 export's own, GELU fused, attention in MultiHeadAttention, no SkipLayerNormalization, the same values,
and close to fp32."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import fxquant
from fxquant.lower.onnx_export import export_float_onnx, ort_session, run_ort
from fxquant.lower.ort.cpu_graph import for_ort_cpu
from fxquant.lower.size_guards import PREFIX

transformers = pytest.importorskip("transformers")
LAYERS = 2


def _bert() -> torch.nn.Module:
    """A BertModel with two layers of width 256 (4 heads of 64, as BERT-base has; a small vocabulary)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=LAYERS, vocab_size=256, max_position_embeddings=64,
                                     hidden_size=256, num_attention_heads=4, intermediate_size=1024)
    return transformers.BertModel(config).eval()


def _ids(seed: int, length: int = 16, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - 1 - seed % 5:] = 0
    mask[1::2, length // 2:] = 0  # every other sequence of a batch is short
    return torch.randint(0, 256, (batch, length), generator=g), mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(fp32 model, fake-quant model, fp32 ONNX path, int8 ONNX path, export result)."""
    tmp = tmp_path_factory.mktemp("bert")
    model = _bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxquant.quantize(model, _ids(0), [_ids(i) for i in range(4)], backend="onnxruntime_dynamic",
                             progress=False)
        result = fxquant.export_onnx(q, _ids(0), tmp / "int8.onnx", check_latency=False)
    return model, q, export_float_onnx(model, _ids(0), tmp / "fp32.onnx"), result.path, result


def _optimized(path: str, tmp_path) -> Counter:
    out = str(tmp_path / "optimized.onnx")
    ort_session(str(path), optimized_path=out, level="all")
    # the export's input-size checks (fxquant.lower.size_guards) are not part of the model's computation
    return Counter(n.op_type for n in onnx.load(out).graph.node if not n.name.startswith(PREFIX))


def test_ort_runs_integer_linears_and_no_float_op_beyond_the_fp32_models(exported, tmp_path):
    model, _, fp32_path, int8_path, _ = exported
    fp32, int8 = _optimized(fp32_path, tmp_path), _optimized(int8_path, tmp_path)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linears == 6 * LAYERS + 1
    # every Linear in one integer kernel; attention's q, k and v share one (merged GEMM, split after)
    assert int8["DynamicQuantizeMatMul"] == linears - 2 * LAYERS and int8["Split"] == LAYERS
    # attention (q k^T, mask, softmax, . v and the head reshapes) in one kernel per layer
    assert int8["MultiHeadAttention"] == LAYERS
    assert int8["MatMul"] + int8["FusedMatMul"] + int8["Gemm"] + int8["FusedGemm"] + int8["Softmax"] == 0
    assert int8["Gelu"] == LAYERS and int8["Erf"] == 0
    assert int8["SkipLayerNormalization"] == 0 and int8["LayerNormalization"] == 2 * LAYERS + 1
    assert fp32["SkipLayerNormalization"] == 2 * LAYERS  # the plain export is left as ORT fuses it
    for op in ("Mul", "Div", "Add", "Where", "Softmax", "Transpose", "Reshape", "Erf", "IsNaN"):
        assert int8[op] <= fp32[op], op


def test_export_agrees_with_fake_quant_and_stays_close_to_fp32(exported):
    model, q, _, int8_path, result = exported
    assert result.ort_sqnr_db >= 30.0
    session = ort_session(str(int8_path), level="all")
    for seed in range(1, 6):  # other sentences, padding, batches and lengths than the export's example
        ids = _ids(seed, 10 + 4 * seed, 1 + seed % 3)
        with torch.no_grad():
            ref, fake = model(*ids).last_hidden_state, q(*ids)["last_hidden_state"]
        got = torch.from_numpy(run_ort(session, ids)[0])
        keep = ids[1].bool()
        cos = torch.nn.functional.cosine_similarity(got[keep], ref[keep], dim=-1)
        assert float(cos.min()) >= 0.99, seed
        agree = torch.nn.functional.cosine_similarity(got[keep], fake[keep], dim=-1)
        assert float(agree.min()) >= 0.999, seed


def test_the_passes_keep_every_value_bit_for_bit(exported, tmp_path):
    """The export with its residual Sums written back as Adds gives the same bits in ORT (basic level: no fusion
    on either side); GELU's reorder is checked bit for bit below."""
    _, _, _, int8_path, _ = exported
    rewritten = onnx.load(str(int8_path))
    original = onnx.load(str(int8_path))
    for node in original.graph.node:
        if node.op_type == "Sum":
            node.op_type = "Add"
    assert for_ort_cpu(rewritten) == {"gelu": 0, "residual_layernorm": 0, "float_layers": 0}  # export ran them
    assert Counter(n.op_type for n in rewritten.graph.node)["Sum"] == 2 * LAYERS + 1
    onnx.save(original, tmp_path / "plain.onnx")
    ids = _ids(3)
    a = run_ort(ort_session(str(int8_path), level="basic"), ids)[0]
    b = run_ort(ort_session(str(tmp_path / "plain.onnx"), level="basic"), ids)[0]
    np.testing.assert_array_equal(a, b)


def test_gelu_is_reordered_into_the_pattern_ort_fuses_with_the_same_bits():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]  # how torch.onnx writes F.gelu
    proto = helper.make_model(helper.make_graph(nodes, "gelu", [x], [y], consts),
                              opset_imports=[helper.make_opsetid("", 18)])
    feed = {"x": np.random.default_rng(0).normal(0, 3, (4, 64)).astype(np.float32)}

    def run(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0]

    before = run(proto, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert for_ort_cpu(proto) == {"gelu": 1, "residual_layernorm": 0, "float_layers": 0}
    np.testing.assert_array_equal(run(proto, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), before)
    np.testing.assert_allclose(run(proto, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), before, atol=1e-6)


class _Attention(torch.nn.Module):
    """One attention block through F.scaled_dot_product_attention, with a boolean, float or no mask."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))
        self.mask = mask

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (4, 8)).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = {"none": None, "bool": m[:, None, None, :] > 0, "float": (1.0 - m[:, None, None, :]) * -1e4}
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[self.mask])
        return self.o(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize(("mask", "fused"), [("none", 1), ("bool", 1), ("float", 0)])
def test_float_attention_becomes_one_multihead_attention_where_it_matches(mask, fused, tmp_path):
    torch.manual_seed(0)
    model = _Attention(mask).eval()
    m = torch.tensor([[1.0] * 6 + [0.0] * 3])
    batches = [(torch.randn(1, 9, 32), m) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxquant.quantize(model, batches[0], batches, backend="onnxruntime_dynamic", progress=False)
        result = fxquant.export_onnx(q, batches[0], tmp_path / "m.onnx", check_latency=False)
    ops = _optimized(result.path, tmp_path)
    assert ops["MultiHeadAttention"] == fused and ops["Softmax"] == 1 - fused  # a float mask stays decomposed
    assert ops["DynamicQuantizeMatMul"] == 2  # q/k/v merged, output projection
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        expected = q(x, m)
    got = torch.from_numpy(run_ort(ort_session(str(result.path)), (x, m))[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
