"""The shape, index, comparison and rounding ops ORT leaves between its integer kernels (shape-dependent masks and
position ids of a transformer exported with a dynamic sequence length): each one-op ONNX graph in ONNX Runtime
against the exact program's kernel for it, on negative indices, ties and every attribute the kernel reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from fxquant.lower.exact.program import KERNELS, _attributes

RNG = np.random.default_rng(0)
FLOATS = (RNG.standard_normal((3, 5, 7)) * 3).astype(np.float32)
HALVES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -3.51], np.float32)  # round half to even, floor, ceil
INTS = RNG.integers(-9, 10, (4, 6)).astype(np.int64)
DIVISORS = np.array([3, -4, 5, -7, 2, 9], np.int64)

CASES = {
    "GatherElements": (dict(axis=1), [FLOATS, RNG.integers(-5, 5, (3, 4, 7)).astype(np.int64)]),
    "GatherElements_axis0": (dict(axis=0), [INTS, RNG.integers(-4, 4, (2, 6)).astype(np.int64)]),
    "Gather_scalar_index": (dict(axis=0), [np.array([1, 9, 4], np.int64), np.array(-2, np.int64)]),
    "GreaterOrEqual": ({}, [INTS, INTS[:1]]),
    "LessOrEqual": ({}, [FLOATS, np.float32(0.5) * np.ones((1, 1, 7), np.float32)]),
    "Xor": ({}, [INTS > 0, INTS < 3]),
    "Mod": ({}, [INTS, DIVISORS]),
    "Mod_fmod": (dict(fmod=1), [INTS, DIVISORS]),
    "Floor": ({}, [HALVES]),
    "Ceil": ({}, [HALVES]),
    "Round": ({}, [HALVES]),
    "CumSum": ({}, [INTS, np.array(1, np.int64)]),
    "CumSum_exclusive_reverse": (dict(exclusive=1, reverse=1), [INTS, np.array(-1, np.int64)]),
    "Trilu": ({}, [INTS, np.array(1, np.int64)]),
    "Trilu_lower": (dict(upper=0), [INTS, np.array(-1, np.int64)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_onnx_runtime(case: str) -> None:
    op = case.split("_")[0]
    attributes, arrays = CASES[case]
    names = [f"in{i}" for i in range(len(arrays))]
    node = helper.make_node(op, names, ["y"], **attributes)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype),
                                            np.shape(a)) for n, a in zip(names, arrays, strict=True)]
    got = KERNELS[("", op)](*(torch.from_numpy(np.asarray(a)) for a in arrays), target="vnni",
                            **_attributes(node)).numpy()
    # the output declared with the kernel's dtype: ORT refuses to load the graph if its own inferred type differs
    output = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(got.dtype), got.shape)
    graph = helper.make_graph([node], "g", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the op, not its fold
    expected = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {n: np.asarray(a) for n, a in zip(names, arrays, strict=True)})[0]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)
