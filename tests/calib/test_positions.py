"""Padded positions do not set ranges: calibrating on padded batches gives the ranges of the unpadded sentences."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.calib.positions import TokenAxes, _classify
from fxquant.quantizer import TensorQuantizer

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

MAX_RANGES = fxquant.QuantConfig(activation=fxquant.QuantSpec(8, calib_method="max"), smoothquant=False,
                                 outlier_channels=False)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _sentences() -> tuple[list[tuple], list[tuple]]:
    """The same 8 sentences as 8 unpadded batches and as 2 batches of 4 padded to 16."""
    g = torch.Generator().manual_seed(0)
    unpadded, padded = [], []
    for lengths in ([5, 9, 12, 7], [12, 3, 8, 10]):
        ids, mask = torch.randint(1, 120, (4, 16), generator=g), torch.zeros(4, 16, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
            unpadded.append((ids[i:i + 1, :n], mask[i:i + 1, :n]))
        padded.append((ids, mask))
    return unpadded, padded


def _ranges(model: nn.Module, backend: str, batches: list[tuple], example: tuple) -> tuple[dict, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, example, backend=backend, config=MAX_RANGES)
    fxquant.calibrate(prepared, batches, progress=False)
    return {n: float(q.amax) for n, q in prepared.named_modules()
            if isinstance(q, TensorQuantizer) and not q.constant}, prepared


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_padded_batches_calibrate_the_ranges_of_the_unpadded_sentences(backend: str) -> None:
    model = _bert()
    unpadded, padded = _sentences()
    example = (padded[0][0][:1, :6], padded[0][1][:1, :6])  # one sentence, as a first call has
    reference, _ = _ranges(model, backend, unpadded, example)
    ranges, prepared = _ranges(model, backend, padded, example)
    assert ranges.keys() == reference.keys()
    for name, amax in ranges.items():  # every range, to float noise: padding changed none of them
        assert amax == pytest.approx(reference[name], rel=1e-4), name
    positions = fxquant.report_of(prepared).ptq["ranges"]
    assert positions.data["mask"] == "attention_mask"
    assert len(positions.data["masked"]) >= len(ranges) - 1  # all but the pooler's ([CLS] rows only)
    assert "48%" in positions.done[0]
    # without the mask the padded positions widen ranges: what the test guards against
    opened = [(ids, torch.ones_like(mask)) for ids, mask in padded]
    widened, _ = _ranges(model, backend, opened, example)
    assert sum(widened[n] > 1.05 * reference[n] for n in reference) >= 3


class _KeyPadding(nn.Module):
    """torch's convention: ``key_padding_mask`` is True at padded positions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (~key_padding_mask)[..., None]


def test_key_padding_mask_marks_padding_with_true() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 8)
    pad = torch.zeros(4, 8, dtype=torch.bool)
    pad[:, 5:] = True
    x[pad] = 100.0  # padded positions hold what no real one does
    ranges, prepared = _ranges(_KeyPadding().eval(), "tensorrt", [(x, pad)], (x[:1], pad[:1]))
    assert ranges["x_to_fc_quantizer"] == pytest.approx(float(x[~pad].abs().max()))
    assert fxquant.report_of(prepared).ptq["ranges"].data["mask"] == "key_padding_mask"


class _Additive(nn.Module):
    """An ``attention_mask`` given as an additive float mask (0 / -10000)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 0.0 * attention_mask[..., None]


def test_a_mask_of_other_values_leaves_every_position_counting() -> None:
    torch.manual_seed(0)
    x, additive = torch.randn(4, 8, 8), torch.zeros(4, 8)
    x[:, 5:], additive[:, 5:] = 100.0, -1e4  # not 0/1: not read as padding
    ranges, prepared = _ranges(_Additive().eval(), "tensorrt", [(x, additive)], (x[:1], additive[:1]))
    assert ranges["x_to_fc_quantizer"] == pytest.approx(100.0)
    assert fxquant.report_of(prepared).ptq["ranges"].done == []


@pytest.mark.parametrize("shape, where", [
    ((3, 7, 5), dict(batch=0, seqs=(1,))),  # (batch, length, channels)
    ((3, 4, 7, 5), dict(batch=0, seqs=(2,))),  # (batch, heads, length, head dim)
    ((3, 4, 7, 7), dict(batch=0, seqs=(2, 3))),  # attention scores: queries and keys
    ((12, 7, 5), dict(batch=0, repeat=4, seqs=(1,))),  # heads folded into the batch
    ((7, 3, 5), dict(batch=1, seqs=(0,))),  # sequence first
    ((21, 5), dict(flat=0)),  # tokens flattened
])
def test_token_axes_select_the_real_positions(shape: tuple, where: dict) -> None:
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    static = tuple(None if i in (where.get("batch"), where.get("flat"), *where.get("seqs", ())) else n
                   for i, n in enumerate(shape))
    axes = TokenAxes(static, **where)
    assert axes.fits(torch.Size(shape), 3, 7) and not axes.fits(torch.Size(shape), 3, 6)
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    # the reference: mark each element with its (sequence, query position[, key position]) and keep the real ones
    if "flat" in where:
        real = keep.reshape(-1)[:, None].expand(shape)
    else:
        rows = keep.repeat_interleave(where.get("repeat", 1), 0)
        b, seqs = where["batch"], where["seqs"]
        index = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
        real = rows[index[b], index[seqs[0]]]
        if len(seqs) == 2:
            real = real & rows[index[b], index[seqs[1]]]
    assert torch.equal(axes.select(x, keep), x[real])


def test_probe_shapes_classify_each_layout() -> None:
    p1, p2 = (2, 16), (3, 15)
    assert _classify((2, 16, 32), (3, 15, 32), p1, p2) == TokenAxes((None, None, 32), batch=0, seqs=(1,))
    assert _classify((8, 16, 16), (12, 15, 15), p1, p2) == TokenAxes((None, None, None), batch=0, repeat=4,
                                                                       seqs=(1, 2))
    assert _classify((32, 64), (45, 64), p1, p2) == TokenAxes((None, 64), flat=0)
    assert _classify((2, 64), (3, 64), p1, p2) is None  # a pooled row per sequence: no sequence axis
    assert _classify((2, 32, 64), (3, 30, 64), p1, p2) is None  # twice the length: some other axis
