"""The input-size conditions a capture holds, computed inside the ONNX graph: each condition torch.export can
write (integer arithmetic, comparisons, and/or/not over input sizes) evaluates in ONNX Runtime as in Python, at
sizes on both sides of it; the outputs are untouched where it holds and ORT raises, naming it, where it does not."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fxquant.lower.size_guards import PREFIX, guard_sizes

CONDITIONS = [
    "L['x'].size()[1] > 6",
    "1 < L['x'].size()[1] <= 64",
    "L['x'].size()[1] == L['m'].size()[1]",
    "L['x'].size()[1] != 4",
    "(L['x'].size()[1] % 8) == 0 or L['x'].size()[0] >= 3",
    "((L['x'].size()[1] // 3) * 2 - L['x'].size()[0]) >= 2",
    "not (min(L['x'].size()[1], 10) < max(L['x'].size()[0], 3))",
    "-L['x'].size()[1] + 12 >= 0 and L['m'].size()[1] < 16",
]


def _identity_model() -> onnx.ModelProto:
    """y = x + 1, z = m and the scalar s = sum(m), from inputs x (batch, t, 2) and m (batch, t2)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]), helper.make_node("Identity", ["m"], ["z"]),
         helper.make_node("ReduceSum", ["m"], ["s"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 2]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, ["b", "t2"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "t2"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _holds(code: str, x: np.ndarray, m: np.ndarray) -> bool:
    class Sized:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def size(self) -> tuple[int, ...]:
            return self.a.shape

    return bool(eval(code, {}, {"L": {"x": Sized(x), "m": Sized(m)}}))


@pytest.mark.parametrize("code", CONDITIONS)
def test_each_condition_is_computed_in_the_graph_as_in_python(code: str) -> None:
    proto = _identity_model()
    assert guard_sizes(proto, [(code, f"`{code}`")], ["x", "m"]) == []
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = set()
    for batch, t, t2 in itertools.product((1, 2, 5), (1, 4, 6, 7, 8, 12, 16, 24), (4, 8, 16)):
        x, m = np.random.default_rng(t).standard_normal((batch, t, 2), np.float32), np.ones((batch, t2), np.float32)
        expected = _holds(code, x, m)
        seen.add(expected)
        if expected:
            y, z, total = session.run(None, {"x": x, "m": m})
            assert np.array_equal(y, x + 1) and np.array_equal(z, m), (batch, t, t2)
            assert total.shape == () and total == m.sum()
        else:
            for output in ("y", "z", "s"):  # each output checks on its own: a scalar one too
                with pytest.raises(Exception, match=f"{PREFIX}: the model was captured for inputs where"):
                    session.run([output], {"x": x, "m": m})
    assert seen == {True, False}  # both sides of the condition were run


def test_conditions_it_cannot_write_are_returned_and_the_rest_checked() -> None:
    proto = _identity_model()
    left = guard_sizes(proto, [("L['x'].size()[1] > 6", "a"), ("L['x'].stride()[0] > 1", "b"),
                               ("L['w'].size()[0] == 2", "c")], ["x", "m"])
    assert left == [("L['x'].stride()[0] > 1", "b"), ("L['w'].size()[0] == 2", "c")]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": np.zeros((1, 7, 2), np.float32), "m": np.zeros((1, 3), np.float32)}
    assert [o.name for o in session.get_outputs()] == ["y", "z", "s"]  # the outputs keep their names
    session.run(None, feeds)
    with pytest.raises(Exception, match="where a;"):
        session.run(None, {**feeds, "x": np.zeros((1, 6, 2), np.float32)})
