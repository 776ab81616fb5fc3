"""An attention mask added to the scores (BERT's ``scores + (1 - mask) * -10000``) stays float on every backend."""

from __future__ import annotations

import math
import operator
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.capture.trace import propagate_shapes, trace
from fxquant.ops.attention import masked_softmax
from fxquant.passes.additive_mask import fold_additive_masks
from fxquant.quantizer import TensorQuantizer

torch.set_num_threads(1)


class Attention(nn.Module):
    """One head of classic BERT attention with an additive padding mask and a position bias parameter."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.bias = nn.Parameter(torch.randn(6, 6)) if bias else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(16)
        if self.bias is not None:
            scores = scores + self.bias  # a parameter, not a mask: left as it is
        scores = scores + (1.0 - mask[:, None, :]) * -10000.0
        return torch.softmax(scores, dim=-1) @ self.v(x)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 6)
    mask[::2, 3:] = 0.0
    return torch.randn(4, 6, 16, generator=g), mask


def test_the_mask_add_becomes_masked_softmax_and_is_exact() -> None:
    torch.manual_seed(0)
    model = Attention(bias=True).eval()
    gm = trace(model)
    propagate_shapes(gm, _inputs(0))
    result = fold_additive_masks(gm)
    targets = [n.target for n in result.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(masked_softmax) == 1 and torch.softmax not in targets
    assert targets.count(operator.add) == 1  # the position bias add stays
    x = _inputs(1)
    torch.testing.assert_close(result.gm(*x), model(*x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_padded_calibration_keeps_the_scores_range(backend: str) -> None:
    torch.manual_seed(0)
    model = Attention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, _inputs(0), backend=backend)
    fxquant.calibrate(prepared, [_inputs(s) for s in range(1, 5)], progress=False)  # padded batches
    ranges = [float(q.amax) for q in prepared.modules() if isinstance(q, TensorQuantizer) and not q.constant]
    assert max(ranges) < 100.0  # no quantizer shares its range with the -10000 of masked positions
    assert any(e.kind == "masked_softmax" for e in fxquant.report_of(prepared).float_ops)
    qmodel = fxquant.convert(prepared)
    x = _inputs(9)
    with torch.no_grad():
        assert fxquant.sqnr(model(*x), qmodel(*x)) >= 30.0


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x) + x, dim=-1)  # a residual of the scores' own input: not a mask


def test_a_residual_before_a_softmax_is_not_a_mask() -> None:
    gm = trace(_Residual().eval())
    propagate_shapes(gm, (torch.randn(2, 6),))
    assert not fold_additive_masks(gm).modified
