"""Prepare's pass that writes every in-place op of a traced graph out of place (``y.relu_()`` -> ``y.relu()``) and
points each later reader of the changed value at the result, which is what the eager model computes. Where a
view or a buffer shares the changed memory, capture ran that code eagerly instead (``fxquant.capture.inplace``).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.capture.inplace import INPLACE_OPERATORS, functional_candidate
from fxquant.passes.manager import PassResult

# in-place methods with no out-of-place twin of the same name: (the twin, how it maps the arguments)
_METHOD_TWINS = {"zero_": torch.zeros_like, "fill_": "fill", "copy_": "copy"}


def _filled(x: torch.Tensor, value: object) -> torch.Tensor:
    """``x.fill_(value)`` out of place."""
    return torch.full_like(x, 0).add(value) if isinstance(value, torch.Tensor) else torch.full_like(x, value)


def _copied(x: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``x.copy_(src)`` out of place: ``src`` in ``x``'s dtype, broadcast to its shape."""
    return src.to(x.dtype).expand_as(x).clone()


def functionalize(gm: fx.GraphModule) -> PassResult[None]:
    """Every in-place op of ``gm`` out of place, and every later reader of the value it changed reading its
    result instead (see the module docstring). Run after ``aliasing_hazard`` found none."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for node in list(gm.graph.nodes):
        arg = functional_candidate(node, modules)
        if arg is None:
            continue
        _out_of_place(gm, node, modules)
        for user in list(arg.users):
            if user is not node and order.get(user, len(order)) > order[node]:
                user.replace_input_with(arg, node)
        changed = True
    return PassResult(gm, changed)


def _out_of_place(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> None:
    if node.op == "call_module":
        modules[node.target].inplace = False  # prepare's copy; the same result, without changing the input
    elif node.op == "call_function" and node.target in INPLACE_OPERATORS:
        node.target = INPLACE_OPERATORS[node.target]
    elif node.op == "call_function" and "inplace" in node.kwargs:
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        packet = getattr(torch.ops.aten, node.target._schema.name.rpartition("::")[2][:-1], None)
        overload = getattr(packet, node.target._overloadname, None) if packet is not None else None
        if overload is not None:
            node.target = overload
    elif node.op == "call_function":
        node.target = getattr(torch, node.target.__name__[:-1])
    elif node.target in _METHOD_TWINS:
        twin = _METHOD_TWINS[node.target]
        node.op, node.target = "call_function", {"fill": _filled, "copy": _copied}.get(twin, twin)
    elif hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]
