"""The float kernels ORT runs between its integer ones, reproduced bit for bit: one-op ONNX graphs in ORT as the
CPU target against fxquant.lower.exact's torch kernels, on values that cover each kernel's ranges and tails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fxquant.lower.exact import floats, norm, onnx_ops
from fxquant.lower.ort.targets import run_as
from tests.cpus import can_run_as

TARGET = "vnni" if can_run_as("vnni") else "avx2"
pytestmark = pytest.mark.skipif(not can_run_as(TARGET), reason="runs ORT as a VNNI or AVX2 CPU")


def _ort(tmp_path, node: onnx.NodeProto, x: np.ndarray, initializers: list | None = None,
         domain: str = "") -> np.ndarray:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers or [])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = tmp_path / "op.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return run_as(TARGET, path, [x])[0]


def _values(shape: tuple[int, ...], spread: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(np.float32)


def test_tanh(tmp_path) -> None:
    x = _values((1, 20003), 4.0)  # past the clamp at 9, and a tail of 3
    got = _ort(tmp_path, helper.make_node("Tanh", ["x"], ["y"]), x)
    mine = floats.tanh(torch.from_numpy(x)).numpy()
    assert np.array_equal(mine, got)
    assert not np.array_equal(torch.tanh(torch.from_numpy(x)).numpy(), got)  # torch's own tanh is not ORT's


def test_gelu(tmp_path) -> None:
    x = _values((1, 20003), 3.0)
    got = _ort(tmp_path, helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft"), x, domain="com.microsoft")
    assert np.array_equal(floats.gelu(torch.from_numpy(x)).numpy(), got)


@pytest.mark.parametrize("width", [64, 384])
def test_layer_norm(tmp_path, width) -> None:
    x = _values((64, width), 3.0) + 0.5
    scale = np.random.default_rng(1).uniform(0.5, 1.5, width).astype(np.float32)
    bias = _values((width,), 1.0, seed=2)
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-5)
    got = _ort(tmp_path, node, x, [helper.make_tensor("s", TensorProto.FLOAT, [width], scale),
                                   helper.make_tensor("b", TensorProto.FLOAT, [width], bias)])
    mine = norm.layer_norm(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(bias), [1], 1e-5)
    assert np.array_equal(mine.numpy(), got)


@pytest.mark.parametrize("length", [24, 37])
def test_softmax(tmp_path, length) -> None:
    x = _values((48, length), 5.0)
    got = _ort(tmp_path, helper.make_node("Softmax", ["x"], ["y"], axis=-1), x)
    assert np.array_equal(floats.softmax(torch.from_numpy(x), -1, TARGET).numpy(), got)


def test_batch_norm(tmp_path) -> None:  # a BatchNorm fxquant cannot fold (DenseNet's, after a concat)
    channels = 64
    rng = np.random.default_rng(0)
    x = _values((8, channels, 16, 16), 2.0)
    params = {"s": rng.uniform(0.5, 1.5, channels), "b": rng.uniform(-0.3, 0.3, channels),
              "m": rng.uniform(-0.5, 0.5, channels), "v": rng.uniform(0.5, 2.0, channels)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5)
    got = _ort(tmp_path, node, x, [helper.make_tensor(k, TensorProto.FLOAT, [channels], v) for k, v in params.items()])
    mine = onnx_ops.batch_norm(*(torch.from_numpy(a) for a in (x, params["s"], params["b"], params["m"], params["v"])))
    assert np.array_equal(mine.numpy(), got)
