"""Dynamic activations: fxquant's per-forward uint8 arithmetic against ONNX Runtime's DynamicQuantizeLinear,
and the QuantSpec validation of the option."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fxquant import QuantSpec, qmath
from fxquant.quantizer import TensorQuantizer


@pytest.fixture(scope="module")
def ort_dql():
    """A session running one DynamicQuantizeLinear on a float tensor of any shape."""
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None),
                               helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("zp", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "normal": rng.normal(size=(3, 7, 33)).astype(np.float32),
        "outliers": (rng.normal(size=(4, 64)) * np.where(rng.random((4, 64)) < 0.02, 40, 1)).astype(np.float32),
        "all_positive": rng.uniform(0.5, 3.0, size=(5, 17)).astype(np.float32),
        "all_negative": rng.uniform(-9.0, -0.01, size=(5, 17)).astype(np.float32),
        "constant": np.full((4, 9), 1.7, np.float32),
        "zero": np.zeros((2, 8), np.float32),
        "half_steps": (np.arange(-64, 192, dtype=np.float32) * 0.5 / 255 * 2),  # codes land on .5 ties
        "tiny": rng.normal(size=(6, 10)).astype(np.float32) * 1e-30,
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_codes_scale_zero_point_match_ort_bit_for_bit(ort_dql, case):
    x = _cases()[case]
    y, scale, zp = ort_dql.run(None, {"x": x})
    step, zero_point = qmath.dynamic_qparams(torch.from_numpy(x))
    assert step.item() == scale.item()  # bit-exact float32
    assert zero_point.item() == int(zp)
    codes = qmath.fake_quant_dynamic(torch.from_numpy(x), fake=False)
    np.testing.assert_array_equal(codes.numpy().astype(np.uint8), y)
    deq = qmath.fake_quant_dynamic(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(deq, (y.astype(np.float32) - np.float32(zp)) * scale)


def test_quantizer_uses_each_batch_range_and_needs_no_calibration():
    q = TensorQuantizer(QuantSpec(dynamic=True, symmetric=False))
    assert q.is_calibrated  # nothing to calibrate
    small, large = torch.linspace(-1, 1, 101), torch.linspace(-50, 50, 101)
    assert (q(small) - small).abs().max() <= 1 / 255 + 1e-7  # its own range: steps of 2/255
    assert (q(large) - large).abs().max() <= 50 / 255 + 1e-5
    q.set_mode("calib")
    assert torch.equal(q(small), small)  # calibration passes data through and collects nothing
    assert q.calibrator.num_batches == 0


def test_per_token_ranges_follow_each_row():
    x = torch.stack([torch.linspace(-1, 1, 64), torch.linspace(-100, 100, 64)])
    per_tensor = qmath.fake_quant_dynamic(x)
    per_token = qmath.fake_quant_dynamic(x, per_token=True)
    err_tensor, err_token = (x - per_tensor)[0].abs().max(), (x - per_token)[0].abs().max()
    assert err_token <= 1 / 255 + 1e-6 < err_tensor  # the small row keeps its own 8 bits
    step, _ = qmath.dynamic_qparams(x, per_token=True)
    assert step.shape == (2, 1)


def test_gradient_passes_straight_through():
    x = torch.randn(4, 8, requires_grad=True)
    TensorQuantizer(QuantSpec(dynamic=True, symmetric=False))(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("kwargs, field", [
    ({"dynamic": True}, "symmetric"), ({"dynamic": True, "symmetric": False, "num_bits": 4}, "num_bits"),
    ({"dynamic": True, "symmetric": False, "axis": 0}, "axis"), ({"per_token": True, "symmetric": False}, "dynamic"),
    ({"dynamic": True, "symmetric": False, "scale_amax": 2.0}, "scale_amax"), ({"dynamic": 1}, "dynamic")])
def test_invalid_dynamic_specs_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        QuantSpec(**kwargs)

