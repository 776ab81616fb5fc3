"""In-place ops in a captured graph: written out of place, or refused where the graph cannot keep their meaning.

torch.fx records ``y.relu_()``, ``y.add_(z)``, ``F.relu(y, inplace=True)``, ``torch.relu_(y)`` and an
``nn.ReLU(inplace=True)`` call as nodes whose result nobody may read: later code reads ``y``, which the graph
shows as the value *before* the op. Eager PyTorch runs them in order on one buffer, but once prepare inserts a
quantizer between ``y`` and its next reader, that reader sees the unchanged tensor (a ReLU lost on the TensorRT
backend). ``fxquant.passes.functionalize`` makes every such op out of place and points each later reader of ``y`` at its
result, which is what the eager model computes.

That holds only when nothing else shares ``y``'s memory: an in-place op on a view (``y.view(-1).relu_()``)
changes the base too. ``aliasing_hazard`` finds an in-place op whose changed memory is read again through
another value, and where a module's forward changes its own buffers (``self.steps += 1``, a running mean):
torch.fx runs such code once at trace time (buffers are constants to it), so a graph cannot carry it. Capture
then runs that module eagerly, where the ops run as written (``fxquant.capture.partition``).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

# ops whose result shares memory with their first argument (conservative: reshape/flatten/contiguous may copy)
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "t",
    "permute", "expand", "expand_as", "narrow", "select", "unfold", "diagonal", "as_strided", "detach", "contiguous",
    "swapaxes", "swapdims", "movedim", "moveaxis", "split", "chunk", "unbind", "split_with_sizes", "tensor_split",
    "real", "imag", "view_as_real", "T", "mT", "H", "mH", "__getitem__",
})
VIEW_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.narrow,
    torch.select, torch.diagonal, torch.detach, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
    torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.t, operator.getitem, torch.as_strided,
})
# augmented assignments (``y += z``) and their out-of-place operators
INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                     operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                     operator.imatmul: operator.matmul, operator.iand: operator.and_, operator.ior: operator.or_}


def mutated_arg(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The value an in-place node changes (its first argument), or None for an out-of-place node."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("_") and name != "requires_grad_" else None
    if node.op == "call_function":
        if node.target in INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return first
        name = getattr(node.target, "__name__", "")
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name.rpartition("::")[2]
        if name.endswith("_") and not name.startswith("_") and (
                getattr(torch, name, None) is node.target or isinstance(node.target, torch._ops.OpOverload)):
            return first
        return None
    if node.op == "call_module":
        return first if getattr(modules.get(node.target), "inplace", False) is True else None
    return None


def functional_candidate(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The value ``node`` changes in place, unless it is model state: a buffer update (torch.export's
    ``copy_(buffer, new)``) stays as written."""
    arg = mutated_arg(node, modules)
    while arg is not None and arg.op != "get_attr" and arg.args and isinstance(arg.args[0], fx.Node) \
            and (_is_view(arg) or mutated_arg(arg, modules) is not None):
        arg = arg.args[0]
    return None if arg is None or arg.op == "get_attr" else mutated_arg(node, modules)


def has_inplace_ops(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` has an in-place op ``functionalize`` rewrites."""
    modules = dict(gm.named_modules())
    return any(functional_candidate(n, modules) is not None for n in gm.graph.nodes)


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    return node.op == "call_function" and node.target in VIEW_FUNCTIONS


def _alias_roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Each node -> the node whose memory it shares (itself when it owns its memory)."""
    modules = dict(gm.named_modules())
    root: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        base = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if base is not None and (_is_view(node) or mutated_arg(node, modules) is base):
            root[node] = root.get(base, base)
        else:
            root[node] = node
    return root


def _tensor_of(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The node that made the tensor ``node`` is (an in-place op returns the tensor it changed)."""
    while (arg := mutated_arg(node, modules)) is not None:
        node = arg
    return node


def aliasing_hazard(gm: fx.GraphModule) -> fx.Node | None:
    """The first in-place node whose changed memory is read later through another value (a view, its base, a
    sibling view), or that changes a parameter or buffer; None when every in-place op can go out of place."""
    modules = dict(gm.named_modules())
    root = _alias_roots(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        arg = mutated_arg(node, modules)
        if arg is None:
            continue
        if root[arg].op == "get_attr":
            return node
        tensor = _tensor_of(arg, modules)  # y, y.relu_(), y.relu_().add_(1): one tensor, rewired in order
        sharing = [n for n in gm.graph.nodes if root[n] is root[arg] and order[n] < order[node]
                   and _tensor_of(n, modules) is not tensor]
        if any(order[u] > order[node] for n in sharing for u in n.users):
            return node
    return None


@contextlib.contextmanager
def kept_buffers(model: torch.nn.Module) -> Iterator[list[str]]:
    """Restore every buffer of ``model`` after the block (a trace, or the export's forwards, must not advance
    the model's state); yields the list, filled when the block ends, of the buffers changed in place."""
    saved = {name: (b, b._version, b.detach().clone()) for name, b in model.named_buffers()}
    changed: list[str] = []
    try:
        yield changed
    finally:
        with torch.no_grad():
            for name, (b, version, value) in saved.items():
                if b._version != version:
                    changed.append(name)
                    b.copy_(value)
