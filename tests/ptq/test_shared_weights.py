"""SmoothQuant and the outlier-channel split on shared and tied modules (issue 21 section 3): a LayerNorm or Linear
used at several places, a block applied three times (ALBERT), an LM head tied to its embedding. Both passes change
weights in place, so each must account for every user of a weight: the float function stays exact."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from tests.float_twin import float_twin

BACKENDS = ("tensorrt", "onnxruntime")
D = 32


def outliers(x: torch.Tensor) -> torch.Tensor:
    """Two channels far above the rest, as trained transformers' hidden states have."""
    scale = torch.ones(x.shape[-1])
    scale[3], scale[7] = 30.0, 12.0
    return x * scale


class SharedNorm(nn.Module):
    """One LayerNorm applied to two inputs (a parameter-saving encoder), each read by its own Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.a, self.b, self.c = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.c(self.norm(self.a(self.norm(x)))) + self.b(self.norm(x))


class SharedLinear(nn.Module):
    """A Linear reading a LayerNorm's output and, elsewhere, the raw input: smoothing its weight breaks that call."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.q, self.o = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.q(self.norm(x)) + self.o(self.q(x))


class Albert(nn.Module):
    """ALBERT-style sharing: one pre-norm FFN block applied three times."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        for _ in range(3):
            x = x + self.down(F.gelu(self.up(self.norm(x))))
        return x


class TiedHead(nn.Module):
    """A small causal-LM shape: embedding, a residual FFN, and an LM head tied to the embedding."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed, self.norm, self.ff = nn.Embedding(vocab, D), nn.LayerNorm(D), nn.Linear(D, D)
        self.head = nn.Linear(D, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.ff(self.norm(h))
        return self.head(outliers(h))


class LinearTwice(nn.Module):
    """One Linear called on two different inputs, both with outlier channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.fc(outliers(self.a(x))) + self.fc(outliers(x))


def _data(model: nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if isinstance(model, TiedHead):
        return [torch.randint(0, 50, (4, 6), generator=g) for _ in range(4)]
    return [outliers(torch.randn(4, 6, D, generator=g)) for _ in range(4)]


def _calibrated(model: nn.Module, backend: str) -> nn.Module:
    data = _data(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, data[0], backend=backend)
    return fxquant.calibrate(prepared, data, progress=False)


def _float_db(model: nn.Module, prepared: nn.Module) -> float:
    """The float function left by calibrate's float-exact passes: quantizers off, and the biases the onnxruntime
    default's bias correction shifted (on purpose: it compensates the weights' rounding) put back."""
    twin = float_twin(prepared)
    x = _data(model)[0]
    with torch.no_grad():
        return fxquant.sqnr(model(x), twin(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [SharedNorm, SharedLinear, Albert, TiedHead, LinearTwice])
def test_shared_and_tied_modules_stay_float_exact(cls, backend):
    # before (float function after calibrate's passes, quantizers off): SharedNorm 0.4 dB, SharedLinear -12.6 dB,
    # TiedHead 0.4 dB (the embedding's columns zeroed), LinearTwice 0.4 dB or a crash (a shape error mid-calibration)
    torch.manual_seed(0)
    model = cls().eval()
    prepared = _calibrated(model, backend)
    assert _float_db(model, prepared) > 100
    x = _data(model)[0]
    with torch.no_grad():
        assert fxquant.sqnr(model(x), fxquant.convert(prepared)(x)) > 20


def test_a_shared_norm_is_smoothed_once_with_every_call():
    torch.manual_seed(0)
    for cls, calls in ((SharedNorm, 3), (Albert, 3)):
        report = fxquant.report_of(_calibrated(cls().eval(), "tensorrt")).ptq["smoothquant"]
        assert len(report.done) == 1 and f"({calls} calls, smoothed once)" in report.done[0], report.done
        assert list(report.data["layers"]) == ["norm"]


def test_a_linear_called_on_another_input_is_not_smoothed():
    torch.manual_seed(0)
    ptq = fxquant.report_of(_calibrated(SharedLinear().eval(), "tensorrt")).ptq
    smooth = ptq.get("smoothquant")
    assert smooth is None or not smooth.done
    notes = fxquant.report_of(_calibrated(SharedLinear().eval(), "tensorrt")).skipped
    assert not any("`q`" in line for line in (smooth.done if smooth else [])), notes


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tied_lm_head_keeps_the_embedding(backend):
    torch.manual_seed(0)
    model = TiedHead().eval()
    embedding = model.embed.weight.detach().clone()
    prepared = _calibrated(model, backend)
    split = fxquant.report_of(prepared).ptq["outlier_channels"]
    assert any(line.startswith("`head`: input channel(s) [3") and line.endswith(
        "the weight is shared elsewhere, so its columns stay") for line in split.done), split.done
    # the embedding reads the head's weight in the prepared model (torch.export captured it through the tie)
    assert torch.equal(prepared.head.weight, embedding)  # before: the outlier columns were zeroed in both


def test_a_linear_split_at_two_sites_gets_one_side_weight_each():
    torch.manual_seed(0)
    prepared = _calibrated(LinearTwice().eval(), "tensorrt")
    split = fxquant.report_of(prepared).ptq["outlier_channels"]
    assert sum(line.startswith("`fc`") for line in split.done) == 2
    names = sorted(n for n, _ in prepared.named_parameters() if n.startswith("fc_outlier_weight"))
    assert names == ["fc_outlier_weight", "fc_outlier_weight_1"]
    assert torch.count_nonzero(prepared.fc.weight) == D * D  # shared by two sites: no column zeroed
