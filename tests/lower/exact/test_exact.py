"""convert(exact=...): the torch model computes ONNX Runtime's outputs bit for bit, on inputs other than the
example, as the CPU target it names (natively on a VNNI machine, as an AVX2 CPU under qemu)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends import get_backend
from fxquant.errors import ConfigError, ConversionError
from fxquant.lower.exact import model as exact_model
from fxquant.lower.ort.targets import run_as
from fxquant.metrics import sqnr
from tests.cpus import can_run_as, needs_avx2, needs_vnni


def _quantized(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor], target: str,
               backend: str = "onnxruntime", config: fxquant.QuantConfig | None = None):
    config = config or fxquant.QuantConfig(target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model.eval(), example, backend=backend, config=config)
        fxquant.calibrate(prepared, batches, progress=False)
    return fxquant.convert(prepared), fxquant.convert(prepared, exact=target)


def _export(exact: nn.Module, example: torch.Tensor, path) -> fxquant.ExportResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.export_onnx(exact, example, path, check_latency=False)


def _ort(target: str, path: str, x: torch.Tensor) -> np.ndarray:
    return run_as(target, path, [x.numpy()])[0]


@needs_vnni
def test_the_digits_net_is_exact_on_the_test_set(digits, tmp_path) -> None:
    model, (x_train, _, x_test, _) = digits
    fake, exact = _quantized(model, x_train[:8], [x_train[i:i + 64] for i in range(0, 512, 64)], "vnni")
    result = _export(exact, x_train[:8], tmp_path / "digits.onnx")
    assert result.differing_outputs == 0 and result.first_mismatch is None
    ort_out = _ort("vnni", result.path, x_test)  # 450 images the example never showed
    with torch.no_grad():
        mine, twin = exact(x_test).numpy(), fake(x_test)
    assert ort_out.shape == mine.shape == (len(x_test), 10)
    assert np.array_equal(mine, ort_out)  # bit for bit
    assert sqnr(torch.from_numpy(ort_out).double(), twin.double()) < 60  # the fake-quant model is not


class Saturating(nn.Module):
    """Convs and a Linear whose 8-bit weights saturate ORT's int16 pair sums on AVX2 (every weight near its
    channel's maximum magnitude with a random sign: half the adjacent pairs are same-signed near 127 and saturate
    where both activations are large), with odd channel counts (pairs straddle kernel taps)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.fc = nn.Linear(5 * 6 * 6, 4)
        with torch.no_grad():
            for w in (self.conv1.weight, self.conv2.weight, self.fc.weight):
                w.copy_(torch.randn_like(w).sign() * (0.8 + 0.2 * torch.rand_like(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


@needs_avx2
def test_avx2_int16_saturation_is_reproduced_under_qemu(tmp_path) -> None:
    torch.manual_seed(0)
    model = Saturating()
    x = torch.randn(2, 3, 6, 6)
    eight_bit = get_backend("onnxruntime").weight.with_(num_bits=8)  # plain 8-bit weights: they saturate
    plain = fxquant.QuantConfig(weight=eight_bit, target="avx2")
    fake, exact = _quantized(model, x, [torch.randn(8, 3, 6, 6)], "avx2", config=plain)
    result = _export(exact, x, tmp_path / "sat.onnx")
    assert result.differing_outputs == 0
    new = torch.randn(3, 3, 6, 6)
    ort_avx2 = _ort("avx2", result.path, new)
    with torch.no_grad():
        mine, twin = exact(new).numpy(), fake(new)
    assert np.array_equal(mine, ort_avx2)
    # the saturation is real: the same graph on a VNNI CPU (exact sums) and the fake-quant model disagree with it
    ort_vnni = _ort("vnni", result.path, new) if can_run_as("vnni") else None
    assert sqnr(torch.from_numpy(ort_avx2).double(), twin.double()) < 15  # measured 6.3 dB
    if ort_vnni is not None:
        assert not np.array_equal(ort_vnni, ort_avx2)


def test_mismatches_are_counted_and_located(tmp_path) -> None:
    torch.manual_seed(0)
    target = "vnni" if can_run_as("vnni") else "avx2"
    x = torch.rand(2, 3, 6, 6)
    config = fxquant.QuantConfig(target=target, bias_correction=False)  # no shifted bias to hide a code change
    _, exact = _quantized(Saturating(), x, [torch.rand(8, 3, 6, 6)], target, config=config)
    program = exact.program
    conv2 = next(n for n in program.graph.nodes if n.op == "call_function" and "conv2" in n.name)
    weight = conv2.args[3]  # QLinearConv(x, x_scale, x_zp, w, ...): the int8 weight buffer
    codes = getattr(program, weight.target)
    codes[0] = -codes[0]  # the first output channel's filter negated in the torch program only
    result = _export(exact, x, tmp_path / "m.onnx")
    assert 0 < result.differing_outputs <= result.exact.total
    found = result.first_mismatch
    # conv2's requantized codes (written by the quantizer after conv2 + ReLU, fused by ORT into conv2's QLinearConv)
    assert found is not None and found.op_type == "QuantizeLinear"
    assert (found.ort_op, found.ort_node) == ("QLinearConv", "conv2/Conv")
    assert found.differing == 2 * 6 * 6 and found.total == 2 * 5 * 6 * 6  # one channel of five, for 2 images


def test_another_onnxruntime_version_is_named(monkeypatch) -> None:
    monkeypatch.setattr(exact_model.ort, "__version__", "1.31.0")
    message = exact_model.check_ort_version()
    assert exact_model.VERIFIED_ORT in message and "1.31.0" in message
    monkeypatch.setattr(exact_model.ort, "__version__", exact_model.VERIFIED_ORT)
    assert exact_model.check_ort_version() is None


def test_exact_is_refused_where_it_means_nothing() -> None:
    x = torch.rand(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trt = fxquant.prepare(Saturating().eval(), x, backend="tensorrt")
        fxquant.calibrate(trt, [x], progress=False)
        ort_model = fxquant.prepare(Saturating().eval(), x, backend="onnxruntime")
        fxquant.calibrate(ort_model, [x], progress=False)
    with pytest.raises(ConversionError, match="tensorrt backend does not deploy to"):
        fxquant.convert(trt, exact="vnni")
    with pytest.raises(ConfigError, match=r"unknown CPU target exact= 'arm'.*'vnni'.*'avx2'"):
        fxquant.convert(ort_model, exact="arm")


class Block(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear on (batch, tokens, features): ORT's integer matmuls (static
    MatMulIntegerToFloat, dynamic DynamicQuantizeMatMul) around its float LayerNorm (MLAS's AVX2 kernel) and Gelu
    (MLAS's erf polynomial). With dynamic activations one ulp off in the LayerNorm would move the dynamic scale of
    the second Linear and with it most outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(nn.functional.gelu(self.norm(self.a(x))))


@needs_vnni
@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime_dynamic"])
def test_a_transformer_block_is_exact_with_both_presets(backend, tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    _, exact = _quantized(Block(), x, [torch.randn(4, 8, 32)], "vnni", backend=backend)
    result = _export(exact, x, tmp_path / "block.onnx")
    assert result.differing_outputs == 0
    for _ in range(4):  # other batches
        new = torch.randn(3, 8, 32)
        with torch.no_grad():
            assert np.array_equal(exact(new).numpy(), _ort("vnni", result.path, new))


@needs_vnni
def test_a_bert_exported_at_any_length_is_exact_at_other_lengths_and_batches(tmp_path) -> None:
    """Position ids, token types and the padding mask follow the sequence length, so ORT keeps their index and
    comparison ops (GatherElements, GreaterOrEqual, Range, Where) in the graph beside the integer kernels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)

    def ids(seed: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[::2, length - 1 - seed % 3:] = 0  # every other sequence padded
        return torch.randint(0, 120, (batch, length), generator=g), mask

    example = ids(0, 1, 9)
    _, exact = _quantized(transformers.BertModel(config), example, [ids(s, 4, 16) for s in range(1, 3)], "vnni")
    result = _export(exact, example, tmp_path / "bert.onnx")
    assert result.differing_outputs == 0
    for seed, batch, length in ((6, 3, 20), (7, 2, 64)):
        inputs = ids(seed, batch, length)
        with torch.no_grad():
            mine = exact(*inputs).last_hidden_state.numpy()
        assert np.array_equal(mine, run_as("vnni", result.path, [t.numpy() for t in inputs])[0]), (batch, length)
