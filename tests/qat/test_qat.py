"""Quantization-aware training: LSQ gradients by hand, W4A4 digits accuracy and its ONNX export, train/eval
semantics, freezing, checkpoints that resume exactly, and the errors for models and optimizers QAT cannot use."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxquant
import fxquant.qat
from fxquant import QATError, QuantConfig, QuantSpec
from fxquant.cli.demo_model import DigitsNet, accuracy, run_epochs
from fxquant.lower.onnx_export import ort_session, run_ort
from fxquant.qat import QATQuantizer, lsq_fake_quant

W4 = QuantSpec(num_bits=4, axis=0, narrow_range=True)
A4 = QuantSpec(num_bits=4, symmetric=False, calib_method="mse")
LSQ = QuantConfig(weight=W4.with_(learn_amax=True), activation=A4.with_(learn_amax=True))


def _prepare_qat(model: nn.Module, example: torch.Tensor, config: QuantConfig = LSQ, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare_qat(model, example, backend="onnxruntime", config=config, **kwargs)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, seed: int,
           epochs: int = 1, batch: int = 32) -> None:
    run_epochs(model, opt, x, y, epochs, seed, batch)


# ---- LSQ arithmetic --------------------------------------------------------------------------------------


def test_symmetric_lsq_gradient_is_the_step_size_gradient_scaled():
    spec = QuantSpec(num_bits=4, narrow_range=True)  # codes -7..7, amax 1.4: step 0.2
    x = torch.tensor([0.31, -0.47, 2.5, -3.0], requires_grad=True)
    lo, hi = torch.tensor(-1.4, requires_grad=True), torch.tensor(1.4, requires_grad=True)
    out = lsq_fake_quant(x, lo, hi, spec, None, grad_factor=0.25)
    torch.testing.assert_close(out.detach(), torch.tensor([0.4, -0.4, 1.4, -1.4]))
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # straight through inside the range, zero where clipped
    # LSQ: d out / d step = round(x/s) - x/s inside, qmax / qmin where clipped; amax = 7 * step
    d_step = (2 - 1.55) + (-2 + 2.35) + 7 + (-7)
    # the tie |lo| == |hi| splits the gradient of amax evenly (and keeps the range symmetric)
    torch.testing.assert_close(hi.grad, torch.tensor(0.25 * d_step / 7 / 2))
    torch.testing.assert_close(lo.grad, -hi.grad)


def test_affine_lsq_pulls_the_end_that_clips():
    spec = QuantSpec(num_bits=4, symmetric=False)  # codes 0..15; [-0.5, 1.0]: step 0.1, zero point 5
    x = torch.tensor([0.23, 2.0, -1.0], requires_grad=True)
    lo, hi = torch.tensor(-0.5, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    out = lsq_fake_quant(x, lo, hi, spec, None, grad_factor=1.0)
    torch.testing.assert_close(out.detach(), torch.tensor([0.2, 1.0, -0.5]))
    # the frozen Q/DQ op that convert() uses computes the same values
    frozen = torch.ops.fxquant.quantize_dequantize(x.detach(), torch.tensor(0.1), torch.tensor(5, dtype=torch.uint8),
                                                   0, 0, 15, True)
    assert torch.equal(out.detach(), frozen)
    for i, (d_lo, d_hi) in enumerate([(-(0.0 - 2.3 + 2) / 15, (0.0 - 2.3 + 2) / 15), (0.0, 1.0), (1.0, 0.0)]):
        lo.grad = hi.grad = None
        lsq_fake_quant(x, lo, hi, spec, None, 1.0)[i].backward()
        torch.testing.assert_close(lo.grad, torch.tensor(d_lo), atol=1e-6, rtol=0)
        torch.testing.assert_close(hi.grad, torch.tensor(d_hi), atol=1e-6, rtol=0)


# ---- real data -------------------------------------------------------------------------------------------


def test_w4a4_qat_on_digits_reaches_97_and_exports_the_learned_ranges(digits, tmp_path):
    model, (x_train, y_train, x_test, y_test) = digits
    prepared = _prepare_qat(model, x_test[:1])
    fxquant.calibrate(prepared, [x_train[i:i + 64] for i in range(0, 512, 64)], progress=False)
    ptq = accuracy(fxquant.convert(prepared), x_test, y_test)
    start = {n: p.detach().clone() for n, p in prepared.named_parameters() if n.endswith("._max")}
    assert len(start) == 23  # 9 weight + 14 activation quantizers learn their ranges
    opt = torch.optim.Adam(fxquant.qat.param_groups(prepared, range_lr=5e-5), lr=5e-4)
    fxquant.check_optimizer(prepared, opt)
    _train(prepared, opt, x_train, y_train, seed=0, epochs=3)
    moved = sum(not torch.equal(p, start[n]) for n, p in prepared.named_parameters() if n in start)
    assert moved == len(start)
    qmodel = fxquant.convert(prepared)
    qat = accuracy(qmodel, x_test, y_test)
    assert qat >= 97.0 and qat >= ptq + 1.0, (ptq, qat)
    # the converted model carries the learned ranges
    frozen = dict(qmodel.named_modules())
    for name, q in prepared.named_modules():
        if isinstance(q, QATQuantizer):
            assert torch.equal(frozen[name].scale, q.scale.detach()), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the low-agreement warning: see below
        result = fxquant.export_onnx(qmodel, x_test[:32], tmp_path / "qat.onnx")
    # 4-bit activations make each rounding flip a sixteenth of the range: ORT's int32 biases and summation order
    # flip a few codes (PTQ W4A4 agrees at the same ~15 dB; W8A8 at 35+ dB), so agreement is judged on accuracy
    assert result.ort_sqnr_db >= 10.0
    ops = Counter(n.op_type for n in onnx.load(result.path).graph.node)
    assert ops["Clip"] == ops["QuantizeLinear"] == 15  # 4-bit activations: uint8 Q/DQ clipped to codes 0..15
    session = ort_session(result.path, level="all")
    assert abs(accuracy(lambda x: run_ort(session, (x,))[0], x_test, y_test) - qat) <= 1.0


# ---- train/eval, freezing, checkpoints ---------------------------------------------------------------------


def _small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,))
    return DigitsNet(width=8).eval(), x, y


@pytest.mark.smoke
def test_ema_ranges_move_in_training_mode_only():
    model, x, _ = _small()
    prepared = _prepare_qat(model, x[:1], QuantConfig(weight=W4, activation=A4), ranges="ema", ema_decay=0.5)
    fxquant.calibrate(prepared, [x[:32]], progress=False)
    q = prepared.stem_2_quantizer
    before = q._max.clone()
    prepared.eval()
    prepared(x[32:64] * 3)
    assert torch.equal(q._max, before) and int(q.qat_steps) == 0
    prepared.train()
    seen = []
    q.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().max()))
    prepared(x[32:64] * 3)
    torch.testing.assert_close(q._max, 0.5 * before + 0.5 * seen[0])
    assert seen[0] > 1.5 * before  # the batch was wider than calibration: the range grew
    assert int(q.qat_steps) == 1


def test_learned_ranges_freeze_after_n_steps_and_keep_their_parameters():
    model, x, y = _small()
    prepared = _prepare_qat(model, x[:1], freeze_ranges_after=2)
    fxquant.calibrate(prepared, [x[:32]], progress=False)
    n_params = len(list(prepared.parameters()))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    _train(prepared, opt, x[:64], y[:64], seed=0)  # 2 steps: still learning
    q = prepared.stem_2_quantizer
    assert q.learns_range and not bool(q.ranges_frozen)
    _train(prepared, opt, x[:64], y[:64], seed=1)  # the third forward freezes
    assert not q.learns_range and bool(q.ranges_frozen) and int(q.qat_steps) == 2
    frozen = q._max.clone()
    _train(prepared, opt, x, y, seed=2)
    assert torch.equal(q._max, frozen) and q.learned_max.grad is not None and q.learned_max.grad.abs().max() == 0
    assert len(list(prepared.parameters())) == n_params  # the optimizer's parameters are all still there


@pytest.mark.parametrize("freeze_after", [None, 3])
def test_checkpoint_mid_training_resumes_exactly(freeze_after):
    model, x, y = _small()

    def fresh():
        return _prepare_qat(model, x[:1], freeze_ranges_after=freeze_after)

    a = fresh()
    fxquant.calibrate(a, [x[:32]], progress=False)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    _train(a, opt_a, x[:64], y[:64], seed=0)  # 2 steps
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)  # a checkpoint file
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model_state, opt_state = checkpoint["model"], checkpoint["optimizer"]
    b = fresh()  # a new process: prepare_qat again, then load; no calibration needed
    b.load_state_dict(model_state)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_state)
    fxquant.check_optimizer(b, opt_b)
    for m, opt in ((a, opt_a), (b, opt_b)):
        _train(m, opt, x, y, seed=1)  # 3 more steps (the frozen case freezes during them)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert int(a.stem_2_quantizer.qat_steps) == (3 if freeze_after else 5)
    if freeze_after:  # a checkpoint taken after freezing loads as frozen, and its optimizer state still fits
        c = fresh()
        c.load_state_dict(state_a)
        assert bool(c.stem_2_quantizer.ranges_frozen) and not c.stem_2_quantizer.learns_range
        torch.optim.Adam(c.parameters(), lr=1e-2).load_state_dict(opt_a.state_dict())
    torch.testing.assert_close(fxquant.convert(a)(x), fxquant.convert(b)(x), rtol=0, atol=0)


# ---- errors ------------------------------------------------------------------------------------------------


def test_qat_on_a_converted_model_is_refused_and_its_backward_explains():
    model, x, y = _small()
    qmodel = fxquant.quantize(model, x[:1], [x[:32]], backend="onnxruntime", progress=False)
    with pytest.raises(QATError, match=r"already converted .* frozen constants .* on the original nn\.Module"):
        _prepare_qat(qmodel, x[:1])
    loss = nn.functional.cross_entropy(qmodel.train()(x[:8]), y[:8])
    with pytest.raises(fxquant.ConversionError, match=r"frozen for export.* fxquant\.prepare_qat"):
        loss.backward()


def test_learn_amax_needs_prepare_qat_and_per_tensor_affine_ranges():
    model, x, _ = _small()
    with pytest.raises(ValueError, match=r"only quantization-aware training does: use fxquant\.prepare_qat"):
        fxquant.prepare(model, x[:1], backend="onnxruntime", config=LSQ)
    with pytest.raises(ValueError, match="per-channel affine ranges would learn a zero point per channel"):
        A4.with_(learn_amax=True, axis=1, calib_method="max")
    with pytest.raises(ValueError, match="ranges='minmax' is unknown"):
        _prepare_qat(model, x[:1], ranges="minmax")


def test_check_optimizer_catches_optimizers_built_too_early():
    model, x, _ = _small()
    early = torch.optim.Adam(model.parameters())  # before prepare_qat: the float model's parameters
    prepared = _prepare_qat(model, x[:1])
    with pytest.raises(QATError, match="holds none of this model's parameters: it was built before prepare_qat"):
        fxquant.check_optimizer(prepared, early)
    before_calibration = torch.optim.Adam(prepared.parameters())
    fxquant.calibrate(prepared, [x[:32]], progress=False)
    with pytest.raises(QATError, match=r"misses 46 trainable parameter\(s\) .* build the optimizer after "
                                       "fxquant.calibrate"):
        fxquant.check_optimizer(prepared, before_calibration)
    fxquant.check_optimizer(prepared, torch.optim.Adam(prepared.parameters()))


def test_encodings_round_trip_keeps_learned_ranges_learnable(tmp_path):
    model, x, y = _small()
    a = _prepare_qat(model, x[:1])
    fxquant.calibrate(a, [x[:32]], progress=False)
    _train(a, torch.optim.Adam(a.parameters(), lr=1e-2), x[:64], y[:64], seed=0)
    fxquant.save_encodings(a, tmp_path / "enc.json")
    b = _prepare_qat(model, x[:1])
    fxquant.load_encodings(b, tmp_path / "enc.json")
    quantizers = [(n, q) for n, q in b.named_modules() if isinstance(q, QATQuantizer)]
    assert quantizers and all(q.learns_range for _, q in quantizers)
    scales = {n: q.scale for n, q in a.named_modules() if isinstance(q, QATQuantizer)}
    for name, q in quantizers:
        assert torch.equal(q.scale, scales[name]), name
