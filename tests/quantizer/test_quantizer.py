"""Quantization arithmetic, TensorQuantizer and QuantSpec: exact numbers and validation messages."""

import pytest
import torch

import fxquant
from fxquant import QuantSpec, TensorQuantizer
from fxquant.errors import FxQuantError

# ---- seed numbers (pytorch_quantization semantics) ------------------------------------------------------


def test_tensor_quant_seed_codes_and_scale():
    torch.manual_seed(12345)
    x = torch.rand(10)
    codes, scale = fxquant.tensor_quant(x, x.abs().max())
    assert codes.tolist() == [126, 113, 127, 59, 11, 23, 47, 73, 43, 27]
    assert round(scale.item(), 4) == 128.0057


def test_fake_tensor_quant_seed_values():
    torch.manual_seed(12345)
    x = torch.rand(10)
    out = fxquant.fake_tensor_quant(x, x.abs().max())
    assert [round(v, 4) for v in out.tolist()] == [0.9843, 0.8828, 0.9921, 0.4609, 0.0859,
                                                   0.1797, 0.3672, 0.5703, 0.3359, 0.2109]
    assert out.dtype == x.dtype


def test_tensor_quantizer_4bit_unsigned_per_channel_seed():
    torch.manual_seed(12345)
    x = torch.rand(10, 9, 8, 7)
    quantizer = TensorQuantizer(QuantSpec(num_bits=4, fake_quant=False, axis=0, unsigned=True))
    out = quantizer(x)
    assert out[0, 0, 0, :3].tolist() == [15, 13, 15]
    assert out.min().item() == 0 and out.max().item() == 15
    # per channel (axis 0): every channel's own maximum maps to the top code
    assert out.amax(dim=(1, 2, 3)).tolist() == [15.0] * 10


# ---- tensor_quant / fake_tensor_quant -------------------------------------------------------------------


def test_fake_tensor_quant_straight_through_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    out = fxquant.fake_tensor_quant(x, torch.tensor(1.0))
    out.backward(torch.full_like(x, 3.0))
    # gradient passes through unchanged where |x| <= amax (boundary included), zero outside
    assert x.grad.tolist() == [0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0]


def test_fake_tensor_quant_straight_through_gradient_per_channel_amax():
    x = torch.tensor([[0.5, 1.5], [0.5, 1.5]], requires_grad=True)
    amax = torch.tensor([[1.0], [2.0]])
    fxquant.fake_tensor_quant(x, amax).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_narrow_range_vs_full_range_bounds():
    x = torch.tensor([-10.0, 10.0])
    narrow, _ = fxquant.tensor_quant(x, 1.0, num_bits=8, narrow_range=True)
    full, _ = fxquant.tensor_quant(x, 1.0, num_bits=8, narrow_range=False)
    assert narrow.tolist() == [-127.0, 127.0]
    assert full.tolist() == [-128.0, 127.0]
    # 4 bits: -7 vs -8
    assert fxquant.tensor_quant(x, 1.0, num_bits=4, narrow_range=True)[0].tolist() == [-7.0, 7.0]
    assert fxquant.tensor_quant(x, 1.0, num_bits=4, narrow_range=False)[0].tolist() == [-8.0, 7.0]


def test_unsigned_range():
    x = torch.tensor([0.0, 0.5, 1.0, 10.0])
    codes, scale = fxquant.tensor_quant(x, 1.0, num_bits=8, unsigned=True)
    assert codes.tolist() == [0.0, 128.0, 255.0, 255.0]  # 0.5 * 255 = 127.5 rounds half to even -> 128
    assert scale.item() == 255.0
    fake = fxquant.fake_tensor_quant(x, 1.0, num_bits=8, unsigned=True)
    assert fake.tolist() == pytest.approx([0.0, 128 / 255, 1.0, 1.0])
    # a negative input raises, as pytorch_quantization does (it used to clamp to 0)
    with pytest.raises(fxquant.NegativeInputError, match="Negative values encountered"):
        fxquant.tensor_quant(torch.tensor([-1.0, 0.5]), 1.0, num_bits=8, unsigned=True)


def test_amax_zero_gives_zeros_without_nan():
    x = torch.tensor([-3.0, -1e-9, 0.0, 2.0, 5.0])
    codes, scale = fxquant.tensor_quant(x, 0.0)
    assert codes.tolist() == [0.0] * 5
    assert scale.item() == 1.0
    fake = fxquant.fake_tensor_quant(x, torch.tensor(0.0))
    assert fake.tolist() == [0.0] * 5
    # per-channel: one channel with amax 0, the other normal
    fake = fxquant.fake_tensor_quant(torch.tensor([[1.0, -1.0], [1.0, -1.0]]), torch.tensor([[0.0], [1.0]]))
    assert torch.isfinite(fake).all()
    assert fake.tolist() == [[0.0, 0.0], [1.0, -1.0]]
    # a TensorQuantizer with a fixed amax of 0
    q = TensorQuantizer(QuantSpec(amax=0.0))
    out = q(torch.tensor([1.0, -2.0]))
    assert out.tolist() == [0.0, 0.0]
    assert torch.isfinite(q.scale).all() and q.scale.item() > 0


def test_negative_amax_raises_helpful_value_error():
    with pytest.raises(ValueError, match=r"amax must be >= 0, got a minimum of -1\.0") as info:
        fxquant.tensor_quant(torch.ones(3), -1.0)
    assert "x.abs().max()" in str(info.value)
    with pytest.raises(ValueError, match="amax must be >= 0"):
        fxquant.fake_tensor_quant(torch.ones(2, 2), torch.tensor([[1.0], [-0.5]]))


# ---- TensorQuantizer ------------------------------------------------------------------------------------


def test_per_channel_amax_from_calibration_equals_row_abs_max():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6), torch.randn(4, 6) * 3
    q = TensorQuantizer(QuantSpec(axis=0, fake_quant=False))
    q.set_mode("calib")
    assert torch.equal(q(a), a)  # calib mode returns the input unchanged
    assert torch.equal(q(b), b)
    assert not q.is_calibrated
    q.load_calib_amax()
    q.set_mode("quant")
    both = torch.cat([a, b], dim=1)
    expected = both.abs().amax(dim=1)
    assert q.is_calibrated
    assert torch.equal(q.amax, expected)
    assert torch.allclose(q.scale, expected / 127)
    assert q.zero_point.tolist() == [0.0] * 4
    # each row's own abs max maps to the top code
    assert q(both).abs().amax(dim=1).tolist() == [127.0] * 4
    # and a fake-quant quantizer with the same range is within half a step of the input everywhere
    fake = TensorQuantizer(QuantSpec(axis=0))
    fake._set_range(q._min, q._max)
    err = (fake(both) - both).abs().amax(dim=1)
    assert (err <= expected / 127 / 2 + 1e-6).all()


def test_per_channel_calibration_rejects_a_changing_channel_count():
    q = TensorQuantizer(QuantSpec(axis=1))
    q.set_mode("calib")
    q(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"along axis 1 saw 5 channels after 3"):
        q(torch.randn(2, 5))


def test_tensor_quantizer_axis_out_of_range():
    q = TensorQuantizer(QuantSpec(axis=3))
    with pytest.raises(ValueError, match=r"QuantSpec.axis=3 is out of range for a tensor of shape \(2, 3\)"):
        q(torch.randn(2, 3))


def test_tensor_quantizer_unknown_mode():
    with pytest.raises(ValueError, match=r"valid modes: \('quant', 'calib', 'disabled'\)"):
        TensorQuantizer().set_mode("train")


def test_scale_amax_multiplies_calibrated_range():
    q = TensorQuantizer(QuantSpec(scale_amax=0.5))
    q.set_mode("calib")
    q(torch.tensor([-4.0, 2.0]))
    q.load_calib_amax()
    assert q.amax.item() == 2.0


def test_affine_quantizer_scale_zero_point_and_error():
    data = torch.linspace(-1.0, 3.0, 1001)
    q = TensorQuantizer(QuantSpec(symmetric=False))
    q.set_mode("calib")
    q(data)
    q.load_calib_amax()
    q.set_mode("quant")
    # scale = (3 - (-1)) / 255, zero_point = 0 - round(-1 / scale) = round(63.75) = 64
    assert q.scale.item() == pytest.approx(4 / 255, rel=1e-6)
    assert q.zero_point.item() == 64.0
    out = q(data)
    assert (out - data).abs().max().item() <= q.scale.item() / 2 + 1e-6
    assert out.min().item() == pytest.approx(-64 * 4 / 255, abs=1e-6)
    assert out.max().item() == pytest.approx(191 * 4 / 255, abs=1e-6)
    # integer codes
    codes_q = TensorQuantizer(QuantSpec(symmetric=False, fake_quant=False))
    codes_q._set_range(torch.tensor(-1.0), torch.tensor(3.0))
    codes = codes_q(torch.tensor([-1.0, 0.0, 3.0, 10.0, -10.0]))
    assert codes.tolist() == [0.0, 64.0, 255.0, 255.0, 0.0]


def test_affine_range_is_widened_to_include_zero():
    q = TensorQuantizer(QuantSpec(symmetric=False))
    q._set_range(torch.tensor(1.0), torch.tensor(2.0))
    assert q.scale.item() == pytest.approx(2 / 255, rel=1e-6)
    assert q.zero_point.item() == 0.0
    out = q(torch.tensor([0.0, 2.0]))
    assert out.tolist() == pytest.approx([0.0, 2.0], abs=1e-6)


def test_uncalibrated_quantizer_uses_the_input_range():
    q = TensorQuantizer(QuantSpec(fake_quant=False))
    assert not q.is_calibrated and q.amax is None and q.scale is None
    assert q(torch.tensor([-2.0, 1.0, 2.0])).tolist() == [-127.0, 64.0, 127.0]  # 1 * 63.5 rounds half to even


# ---- QuantSpec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "qmin", "qmax"), [
    (QuantSpec(), -128, 127),
    (QuantSpec(narrow_range=True), -127, 127),
    (QuantSpec(unsigned=True), 0, 255),
    (QuantSpec(num_bits=4), -8, 7),
    (QuantSpec(num_bits=4, narrow_range=True), -7, 7),
    (QuantSpec(num_bits=16), -32768, 32767),
    (QuantSpec(symmetric=False), 0, 255),
    (QuantSpec(num_bits=2, symmetric=False), 0, 3),
])
def test_quant_spec_qmin_qmax(spec, qmin, qmax):
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


@pytest.mark.parametrize(("kwargs", "exc", "fragments"), [
    ({"num_bits": 0}, ValueError, ["QuantSpec.num_bits", "between 2 and 16", "got 0"]),
    ({"num_bits": 17}, ValueError, ["between 2 and 16", "got 17"]),
    ({"num_bits": "8"}, TypeError, ["QuantSpec.num_bits must be an int", "'8'", "str"]),
    ({"num_bits": True}, TypeError, ["QuantSpec.num_bits must be an int", "True", "bool"]),
    ({"num_bits": 8.0}, TypeError, ["QuantSpec.num_bits must be an int"]),
    ({"amax": -1.0}, ValueError, ["QuantSpec.amax must be a finite number >= 0", "-1.0"]),
    ({"amax": float("nan")}, ValueError, ["QuantSpec.amax must be a finite number >= 0"]),
    ({"amax": "1"}, TypeError, ["QuantSpec.amax must be a number or None"]),
    ({"calib_method": "kl"}, ValueError, ["calib_method='kl' is unknown", "valid methods", "'entropy'", "'mse'"]),
        ({"calib_method": "mse", "axis": 0}, ValueError, ["per-channel", "'max' or 'ema'"]),
        ({"percentile": 0}, ValueError, ["QuantSpec.percentile", "(0, 100]"]),
        ({"percentile": 100.5}, ValueError, ["QuantSpec.percentile", "got 100.5"]),
        ({"ema_decay": 1.0}, ValueError, ["QuantSpec.ema_decay", "(0, 1)"]),
    ({"narrow_range": True, "symmetric": False}, ValueError, ["narrow_range", "symmetric=True"]),
    ({"axis": "0"}, TypeError, ["QuantSpec.axis must be an int", "'0'"]),
    ({"unsigned": 1}, TypeError, ["QuantSpec.unsigned must be True or False"]),
    ({"scale_amax": 0}, ValueError, ["QuantSpec.scale_amax must be a finite number > 0"]),
    ({"amax": 1.0, "symmetric": False}, ValueError, ["symmetric=False leave amax=None"]),
    ({"learn_amax": True, "symmetric": False, "axis": 1}, ValueError,
     ["learn_amax=True with symmetric=False", "one activation zero point per tensor", "set axis=None"]),
])
def test_quant_spec_validation(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        QuantSpec(**kwargs)
    assert isinstance(info.value, exc) and isinstance(info.value, FxQuantError)  # fxquant's own, and ValueError/...
    for fragment in fragments:
        assert fragment in str(info.value)


def test_quant_spec_with_revalidates():
    spec = QuantSpec(num_bits=4)
    assert spec.with_(num_bits=6).qmax == 31
    assert spec.num_bits == 4
    with pytest.raises(ValueError, match="between 2 and 16"):
        spec.with_(num_bits=1)


def test_tensor_quantizer_rejects_non_spec():
    with pytest.raises(TypeError, match="TensorQuantizer takes a QuantSpec, got dict"):
        TensorQuantizer({"num_bits": 8})


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(num_bits=4), QuantSpec(narrow_range=True),
                                  QuantSpec(num_bits=4, unsigned=True), QuantSpec(axis=0),
                                  QuantSpec(symmetric=False), QuantSpec(num_bits=4, symmetric=False)],
                         ids=["int8", "int4", "narrow", "uint4", "per-channel", "affine8", "affine4"])
def test_prepared_quantizer_equals_its_frozen_op_bit_for_bit(spec):
    # discrete data (digits-like pixel values k/16) lands on rounding ties; x * (qmax / amax) rounds some of them
    # the other way than x / step, the ONNX arithmetic convert freezes: the two must agree exactly
    from fxquant.lower.frozen import FrozenQuantizer

    x = (torch.arange(17.0) / 16).repeat(3, 1) * torch.tensor([[1.0], [0.7], [3.0]])
    q = TensorQuantizer(spec)
    q.set_mode("calib")
    q(x)
    q.load_calib_amax()
    q.set_mode("quant")
    frozen = FrozenQuantizer(q, is_constant=False)
    for data in (x, x * 1.37) + (() if spec.unsigned else (-x,)):  # unsigned: negative input raises
        assert torch.equal(q(data), frozen(data)), data
