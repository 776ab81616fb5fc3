"""Rewrite two-operand einsums that are batched matrix products as ``torch.matmul``.

MaxViT writes its attention as ``einsum("BGHID,BGHJD->BGHIJ", q, k)`` and ``einsum("BGHIJ,BGHJD->BGHID", a, v)``.
The exporter keeps them as ONNX Einsum, for which neither ORT nor TensorRT has an int8 kernel; as MatMul
(with a transpose for the first) they become QLinearMatMul / int8 MatMul.
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.capture.trace import propagate_shapes
from fxquant.passes.manager import PassResult

TARGET = torch.einsum
"""The op this pass rewrites: the pipeline runs it only when the graph calls it."""


def _as_matmul(equation: str) -> bool | None:
    """True: ``a @ b^T``; False: ``a @ b``; None: not a batched matrix product with a shared batch prefix."""
    try:
        inputs, out = equation.replace(" ", "").split("->")
        a, b = inputs.split(",")
    except ValueError:
        return None
    if "." in a + b or not (len(a) == len(b) == len(out) >= 2) or a[:-2] != b[:-2] or out[:-2] != a[:-2]:
        return None
    i, k = a[-2:]
    if len({i, k, *b[-2:]}) != 3 or i == k:
        return None
    if b[-2:] == k + b[-1] and out[-2:] == i + b[-1] and b[-1] not in (i, k):  # ..ik,..kj->..ij
        return False
    if b[-1] == k and out[-2:] == i + b[-2] and b[-2] not in (i, k):  # ..ik,..jk->..ij
        return True
    return None


def einsum_to_matmul(gm: fx.GraphModule, example_inputs: tuple) -> PassResult:
    """Replace every einsum that is a batched matrix product by matmul (and a transpose when needed), then
    re-run shape propagation on ``example_inputs``."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.einsum or len(node.args) != 3 \
                or not isinstance(node.args[0], str):
            continue
        transpose = _as_matmul(node.args[0])
        if transpose is None:
            continue
        _, a, b = node.args
        with gm.graph.inserting_before(node):
            if transpose:
                b = gm.graph.call_method("transpose", (b, -2, -1))
            mm = gm.graph.call_function(torch.matmul, (a, b))
        node.replace_all_uses_with(mm)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    return PassResult(gm, modified=bool(done))
