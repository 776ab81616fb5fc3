"""fxquant.qmath, the one quantize/dequantize arithmetic, and fxquant.metrics' SQNR: exact numbers by hand and
bit-exact agreement with ONNX QuantizeLinear (onnxruntime)."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fxquant import qmath
from fxquant.errors import QuantRangeError
from fxquant.metrics import SqnrAccumulator, sqnr

# ---- integer ranges ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ((8,), (-128, 127)), ((8, False, True), (-127, 127)), ((8, True), (0, 255)), ((4,), (-8, 7)),
    ((4, False, True), (-7, 7)), ((4, True), (0, 15)), ((8, False, False, False), (0, 255)),
    ((16,), (-32768, 32767)), ((2, False, True), (-1, 1))])
def test_qrange(args, expected):
    assert qmath.qrange(*args) == expected


# ---- scales and zero points -------------------------------------------------------------------------------------


def test_symmetric_step_and_an_empty_range():
    step = qmath.symmetric_step(torch.tensor([1.27, 0.0, 1e-9, 254.0]), 127)
    assert step[1:].tolist() == [1.0, 1.0, 2.0]
    assert step[0].item() == (torch.tensor(1.27) / 127).item()  # float32 division, no reciprocal


def test_affine_qparams_by_hand():
    # [-1, 3] over [0, 255]: step 4 / 255, zero point round(63.75) = 64
    step, zp = qmath.affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255)
    assert step.item() == (torch.tensor(4.0) / 255).item() and zp.item() == 64.0
    # a range that does not hold 0 is widened to hold it: [0.5, 2] -> [0, 2], zero point 0
    step, zp = qmath.affine_qparams(torch.tensor(0.5), torch.tensor(2.0), 0, 255)
    assert step.item() == (torch.tensor(2.0) / 255).item() and zp.item() == 0.0
    # [-2, -1] -> [-2, 0]: zero point at the top
    assert qmath.affine_qparams(torch.tensor(-2.0), torch.tensor(-1.0), 0, 255)[1].item() == 255.0
    # an empty range: step 1, zero point 0
    assert [t.item() for t in qmath.affine_qparams(torch.tensor(0.0), torch.tensor(0.0), 0, 255)] == [1.0, 0.0]


def test_multiplier_is_a_true_division():
    # NVIDIA's scale is max_bound / amax by division; torch's `127.0 / amax` computes amax.reciprocal() * 127
    torch.manual_seed(0)
    amax = torch.rand(100_000) * 10 + 1e-3
    got = qmath.multiplier(amax, 127.0)
    want = np.float32(127.0) / amax.numpy()  # numpy float32 division: correctly rounded
    assert np.array_equal(got.numpy(), want)
    reciprocal = (127.0 / amax).numpy()
    assert (reciprocal != want).mean() > 0.05  # the reciprocal route is off by an ulp for many amax values
    assert qmath.multiplier(torch.tensor([0.0, 1e-9]), 127.0).tolist() == [0.0, 0.0]


def test_check_amax_raises_an_fxquant_value_error():
    with pytest.raises(QuantRangeError, match=r"amax must be >= 0, got a minimum of -0\.5") as info:
        qmath.check_amax(torch.tensor([1.0, -0.5]))
    assert isinstance(info.value, ValueError)


# ---- codes ------------------------------------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25, 63.0, 64.0, -64.5, 100.0])
    codes = qmath.quantize(x, torch.tensor(0.5), 0.0, -128, 127)
    # x / 0.5 = 0.5, 1.5, -0.5, -1.5, 2.5, 126, 128, -129, 200
    assert codes.tolist() == [0.0, 2.0, 0.0, -2.0, 2.0, 126.0, 127.0, -128.0, 127.0]


def test_affine_codes_and_dequantize_by_hand():
    step, zp = qmath.affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255)
    x = torch.tensor([-1.0, 0.0, 3.0, 5.0, -2.0])
    codes = qmath.quantize(x, step, zp, 0, 255)
    # -1 / step = -63.75 -> -64, + 64 = 0; 0 -> 64; 3 / step = 191.25 -> 191 + 64 = 255; clamped beyond
    assert codes.tolist() == [0.0, 64.0, 255.0, 255.0, 0.0]
    assert torch.equal(qmath.dequantize(codes, step, zp), (codes - 64) * step)
    assert qmath.dequantize(codes, step, zp)[1].item() == 0.0  # zero is exact
    assert torch.equal(qmath.fake_quantize(x, step, zp, 0, 255), qmath.dequantize(codes, step, zp))


def test_per_channel_axis():
    x = torch.tensor([[[1.0, -1.0], [0.5, 2.0]], [[1.0, -1.0], [0.5, 2.0]]])  # shape (2, 2, 2)
    step = qmath.along_axis(torch.tensor([1.0 / 127, 2.0 / 127]), x.dim(), 1)
    assert step.shape == (1, 2, 1)
    codes = qmath.quantize(x, step, 0.0, -127, 127)
    assert codes[0].tolist() == [[127.0, -127.0], [32.0, 127.0]]  # 0.5 * 63.5 = 31.75 -> 32
    assert torch.equal(codes[0], codes[1])


def test_float64_stays_float64_only_with_a_float64_step():
    x = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert qmath.quantize(x, torch.tensor(0.01, dtype=torch.float64), 0.0, -128, 127).dtype == torch.float64
    assert qmath.quantize(x, torch.tensor(0.01), 0.0, -128, 127).dtype == torch.float32  # as the runtimes do


def test_quantize_by_multiplier_is_nvidias_formula():
    torch.manual_seed(1)
    x, amax = torch.randn(10_000), torch.tensor(2.5)
    scale = qmath.multiplier(amax, 127.0)
    want = np.clip(np.round(x.numpy() * (np.float32(127.0) / np.float32(2.5))), -127, 127)
    assert np.array_equal(qmath.quantize_by_multiplier(x, scale, -127, 127).numpy(), want)


# ---- fake quantization and its gradient -------------------------------------------------------------------------


def test_fake_quant_symmetric_values_zero_amax_and_gradient():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    out = qmath.fake_quant_symmetric(x, torch.tensor(1.0), -127, 127)
    step = torch.tensor(1.0) / 127
    assert torch.equal(out.detach(), torch.clamp(torch.round(x.detach() / step), -127, 127) * step)
    out.backward(torch.full_like(x, 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]  # |x| <= amax passes, boundary included
    zero = qmath.fake_quant_symmetric(torch.tensor([[3.0, -1.0], [3.0, -1.0]]), torch.tensor([[0.0], [4.0]]),
                                      -127, 127, fake=False)
    assert zero.tolist() == [[0.0, 0.0], [95.0, -32.0]]  # 3 / (4 / 127) = 95.25, 1 / (4 / 127) = 31.75


def test_fake_quant_affine_gradient_inside_the_codes():
    step, zp = qmath.affine_qparams(torch.tensor(0.0), torch.tensor(2.55), 0, 255)
    x = torch.tensor([-0.1, 0.0, 1.0, 2.55, 2.6], requires_grad=True)
    out = qmath.fake_quant_affine(x, step, zp, 0, 255)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert out.dtype == x.dtype and out[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fake_quant_without_gradient_equals_the_autograd_path(dtype):
    # the no-gradient shortcut (in place, no mask) gives exactly the values of the straight-through path:
    # per-channel and per-tensor, a zero amax, rounding ties, values past the range, codes and fake values
    torch.manual_seed(0)
    x = torch.cat([torch.randn(6, 200) * 3, (torch.arange(-600, 600).float().reshape(6, 200) + 0.5) / 64], 1)
    x = x.to(dtype)
    original = x.clone()
    amax = x.float().abs().amax(1, keepdim=True) * torch.tensor([[1.0], [0.5], [0.0], [2.0], [1.0], [0.25]])
    step, zp = torch.tensor(0.03), torch.tensor(117.0)
    for fake in (True, False):
        slow_x = x.clone().requires_grad_()
        with torch.no_grad():
            fast = qmath.fake_quant_symmetric(x, amax, -127, 127, fake=fake)
            fast_affine = qmath.fake_quant_affine(x, step, zp, 0, 255, fake=fake)
        assert torch.equal(fast, qmath.fake_quant_symmetric(slow_x, amax, -127, 127, fake=fake).detach())
        assert torch.equal(fast_affine, qmath.fake_quant_affine(slow_x, step, zp, 0, 255, fake=fake).detach())
        assert fast.dtype == fast_affine.dtype == dtype
    assert torch.equal(x, original)  # the input is not written into
    assert not qmath.fake_quant_symmetric(x, amax, -127, 127)[2].any()  # zero amax: zeros

def test_fake_quant_keeps_half_precision_dtype():
    x = torch.tensor([0.1, -0.7, 0.5], dtype=torch.float16)
    assert qmath.fake_quant_symmetric(x, torch.tensor(1.0), -127, 127).dtype == torch.float16


# ---- bit-exact agreement with ONNX QuantizeLinear --------------------------------------------------------------


def _ort_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    qtype = TensorProto.INT8 if zero_point.dtype == np.int8 else TensorProto.UINT8
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], axis=axis)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("q", qtype, x.shape)],
                              [onnx.numpy_helper.from_array(scale, "scale"),
                               onnx.numpy_helper.from_array(zero_point, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["int8", "uint8-affine", "int8-per-channel"])
def test_codes_equal_onnx_quantize_linear(kind):
    torch.manual_seed(3)
    # random values, values beyond the range, and exact rounding ties of the step 2^-6 (k + 0.5 steps)
    x = torch.cat([torch.randn(4, 3000) * 2, (torch.arange(-300, 300).float() + 0.5).reshape(4, 150) / 64], 1)
    if kind == "int8":
        step, zp, axis, qmin, qmax = qmath.symmetric_step(torch.tensor(127 / 64), 127), torch.tensor(0.0), 1, -128, 127
        assert step.item() == 1 / 64
        zp_np = np.array(0, np.int8)
    elif kind == "uint8-affine":
        step, zp = qmath.affine_qparams(torch.tensor(-3.1), torch.tensor(5.3), 0, 255)
        axis, qmin, qmax, zp_np = 1, 0, 255, zp.numpy().astype(np.uint8)
    else:
        step = qmath.symmetric_step(torch.tensor([127 / 64, 3.0, 5.0, 0.0]), 127)
        zp, axis, qmin, qmax, zp_np = torch.zeros(4), 0, -128, 127, np.zeros(4, np.int8)
    per_axis = 0 if step.dim() else None
    codes = qmath.quantize(x, qmath.along_axis(step, x.dim(), per_axis), qmath.along_axis(zp, x.dim(), per_axis),
                           qmin, qmax)
    got = _ort_quantize(x.numpy(), step.numpy(), zp_np, axis)
    assert np.array_equal(codes.numpy().astype(np.int64), got.astype(np.int64))


# ---- SQNR --------------------------------------------------------------------------------------------------------


def test_sqnr_by_hand():
    assert sqnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    assert sqnr(torch.ones(3), torch.ones(3)) == math.inf
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf


def test_sqnr_accumulator_equals_sqnr_of_the_union():
    torch.manual_seed(4)
    a, b = torch.randn(100), torch.randn(50)
    na, nb = a + 0.01 * torch.randn(100), b + 0.1 * torch.randn(50)
    acc = SqnrAccumulator()
    acc.add(a, na)
    acc.add(b, nb)
    assert acc.db == pytest.approx(sqnr(torch.cat([a, b]), torch.cat([na, nb])), abs=1e-9)
