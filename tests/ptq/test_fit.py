"""The reconstruction's training step (``fxquant.ptq.fit``): QDrop's random masks and the learned activation steps."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.ptq.fit import keep_mask
from fxquant.quantizer import quantizers_of


@pytest.mark.parametrize("p", [0.5, 0.25, 0.9])
def test_keep_mask_keeps_each_element_with_probability_p(p):
    shape = (64, 33, 31, 7)  # 457,408 elements: not a multiple of the 7 bytes each draw gives
    mask = keep_mask(torch.Size(shape), p, torch.Generator().manual_seed(0))
    assert mask.shape == shape and mask.dtype == torch.bool
    assert abs(float(mask.float().mean()) - p) < 0.004
    lanes = mask.reshape(-1)[: 7 * (mask.numel() // 7)].reshape(-1, 7).float().mean(0)  # byte k of every draw
    assert float((lanes - p).abs().max()) < 0.01, lanes
    again = keep_mask(torch.Size(shape), p, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, keep_mask(torch.Size(shape), p, torch.Generator().manual_seed(1)))


def _widened(model, data, factor: float) -> torch.nn.Module:
    """The digits CNN calibrated for ONNX Runtime, every activation range then widened ``factor`` times (a range
    calibration that clipped nothing and wasted most codes)."""
    prepared = fxquant.prepare(model, data[2][:1], backend="onnxruntime")
    fxquant.calibrate(prepared, [data[0][i:i + 64] for i in range(0, 256, 64)], progress=False)
    for q in quantizers_of(prepared).values():
        if not q.constant and q.is_calibrated and not q.spec.dynamic:
            q._store_range(q._min * factor, q._max * factor)
    return prepared


def test_learned_activation_steps_recover_from_wide_ranges_and_export(digits, tmp_path):
    model, data = digits
    x_test = data[2]
    with torch.no_grad():
        ref = model(x_test)
    batches = [data[0][i:i + 64] for i in range(0, 256, 64)]
    scores = {}
    for act_lr in (0.0, 0.05):
        prepared = _widened(model, data, 8.0)
        options = fxquant.AdaRoundOptions(iterations=80, batch_size=32, act_lr=act_lr)
        report = fxquant.adaround(prepared, batches, options, progress=False)
        factors = [f for block in report.data["blocks"].values() for f in block["activation_steps"].values()]
        converted = fxquant.convert(prepared)
        scores[act_lr] = float(fxquant.sqnr(ref, converted(x_test)))
        if act_lr:
            assert factors and sum(f < 0.7 for f in factors) >= len(factors) // 2, factors  # the ranges shrank
            result = fxquant.export_onnx(converted, x_test[:32], tmp_path / "steps.onnx", check_latency=False)
            out = torch.as_tensor(run_ort(ort_session(result.path), (x_test,))[0])
            assert fxquant.sqnr(converted(x_test), out) >= 30.0  # ORT computes the learned steps
        else:
            assert factors == []
    assert scores[0.05] >= scores[0.0] + 3.0, scores
