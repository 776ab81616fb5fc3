"""The ranges pass's forward with element-wise ops written back in place where nothing else reads their input.

Prepare writes every in-place op out of place (``fxquant.passes.functionalize``: ``out += identity`` becomes
``out + identity``, ``nn.ReLU(inplace=True)`` an out-of-place ReLU), which QAT, export and every capture of
intermediate tensors need. The calibrators' pass needs none of that: it runs under ``no_grad`` and keeps no
tensor. An out-of-place add or ReLU costs a fresh buffer and about four times the time of the in-place op the user's
model ran (ResNet-50: 0.25 s of a 2.4 s calibration), so the ranges pass runs a second forward of each GraphModule,
generated from a copy of its graph in which:

* a ReLU / ReLU6 / Hardtanh / SiLU / Hardswish (module without hooks, function or method) runs in place, and
* ``a + b`` (``operator.add``, ``torch.add`` or ``Tensor.add`` without keywords) runs as ``a.add_(b)`` (or
  ``b.add_(a)``) when the two have the same shape and dtype at run time (otherwise out of place, as before),

only where the value changed is *reusable*: produced by an op that returns a new tensor (a convolution, a linear
layer, a normalization, a pooling, an activation or an add, or an op this rewrite already made in place) and read by
this op alone, counting the readers of every TensorQuantizer it passes through (in calib mode a quantizer returns
its input). A producer, quantizer or activation module with hooks (a hook may keep a view of the tensor it sees) is
left out, except for hooks marked ``transient`` (fxquant's statistics taps, which reduce the tensor on the spot: the
input means, GPTQ's Hessians); so is the whole GraphModule while global module hooks are set. The model's own
forward, its graph and its modules are not changed; the swap is undone when the pass ends.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Callable, Iterator
from types import MethodType

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.graph_module import _forward_from_src
from torch.nn.modules import module as _module_state

from fxquant.quantizer import TensorQuantizer

# producers whose output is a new tensor nothing else holds
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                  nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                  nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid)
_FRESH_FUNCTIONS = {operator.add, operator.mul, torch.add, torch.mul, torch.relu, F.relu, F.relu6, F.hardtanh,
                    F.silu, F.hardswish, F.gelu, torch.sigmoid, F.conv1d, F.conv2d, F.conv3d, F.linear,
                    torch.matmul, operator.matmul}
_FRESH_METHODS = {"add", "mul", "relu", "sigmoid", "matmul"}

_ADDS = {operator.add, torch.add}
_CACHE: weakref.WeakKeyDictionary[fx.GraphModule, tuple[tuple, Callable | None]] = weakref.WeakKeyDictionary()


def add_into(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` written into ``a`` when that gives the same tensor (same shape and dtype), else out of place."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype:
        return a.add_(b)
    return a + b


def _in_place_activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Callable, tuple, dict] | None:
    """The in-place twin of an activation node (a function, its arguments after the input, its keywords), or
    None."""
    inplace = {"inplace": True}
    if node.op == "call_module":
        module = modules.get(node.target)
        if module is None or _hooked(module) or len(node.args) != 1 or node.kwargs:
            return None
        twins = {nn.ReLU: (torch.relu_, (), {}), nn.ReLU6: (F.hardtanh_, (0.0, 6.0), {}),
                 nn.SiLU: (F.silu, (), inplace), nn.Hardswish: (F.hardswish, (), inplace)}
        if type(module) is nn.Hardtanh:
            return F.hardtanh_, (module.min_val, module.max_val), {}
        return twins.get(type(module))
    if node.op == "call_function" and len(node.args) == 1 and set(node.kwargs) <= {"inplace"} \
            and not node.kwargs.get("inplace"):
        twins = {torch.relu: (torch.relu_, (), {}), F.relu: (torch.relu_, (), {}),
                 F.relu6: (F.hardtanh_, (0.0, 6.0), {}), F.silu: (F.silu, (), inplace),
                 F.hardswish: (F.hardswish, (), inplace)}
        return twins.get(node.target)
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1 and not node.kwargs:
        return torch.relu_, (), {}
    return None


TRANSIENT = "_fxquant_transient"


def transient(hook: Callable) -> Callable:
    """Mark a module hook that reads its tensors on the spot and keeps none: the ranges pass may still reuse them."""
    setattr(hook, TRANSIENT, True)
    return hook


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has a hook that may keep the tensors it sees."""
    return any(not getattr(h, TRANSIENT, False)
               for hooks in (module._forward_hooks, module._forward_pre_hooks) for h in hooks.values())


class _Aliases:
    """Which values of a graph are reusable buffers (see the module docstring)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.fresh: set[fx.Node] = set()

    def is_quantizer(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.modules.get(node.target), TensorQuantizer)

    def root(self, node: fx.Node) -> fx.Node | None:
        """The node whose output buffer ``node`` passes on (through quantizers), or None when a hooked quantizer is
        on the way."""
        while self.is_quantizer(node):
            if _hooked(self.modules[node.target]) or not node.args or not isinstance(node.args[0], fx.Node):
                return None
            node = node.args[0]
        return node

    def produces_new(self, node: fx.Node) -> bool:
        if node in self.fresh:
            return True
        if node.op == "call_module":
            module = self.modules.get(node.target)
            return isinstance(module, _FRESH_MODULES) and not _hooked(module)
        if node.op == "call_function":
            return node.target in _FRESH_FUNCTIONS and not node.kwargs.get("inplace") and "out" not in node.kwargs
        return node.op == "call_method" and node.target in _FRESH_METHODS

    def readers(self, root: fx.Node) -> list[fx.Node] | None:
        """Every node reading ``root``'s buffer: its users and those of the quantizers it passes through; None when
        one of those quantizers has hooks (which may keep the tensor)."""
        out, todo = [], [root]
        while todo:
            node = todo.pop()
            for user in node.users:
                if not self.is_quantizer(user):
                    out.append(user)
                elif _hooked(self.modules[user.target]):
                    return None
                elif user.args[0] is node:
                    todo.append(user)
                else:  # a quantizer reading it otherwise than as its input: not a pass-through
                    out.append(user)
        return out

    def reusable_by(self, value: object, node: fx.Node) -> bool:
        """Whether ``node`` may write into the buffer behind ``value``."""
        if not isinstance(value, fx.Node):
            return False
        root = self.root(value)
        if root is None or not self.produces_new(root):
            return False
        uses = sum(1 for a in (*node.args, *node.kwargs.values()) if a is value)
        return self.readers(root) == [node] and uses == 1


def reused_graph(gm: fx.GraphModule) -> tuple[fx.Graph, int]:
    """A copy of ``gm.graph`` with the rewrites of the module docstring, and how many ops it made in place."""
    modules = dict(gm.named_modules())
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    graph._codegen = gm.graph._codegen
    aliases = _Aliases(modules)
    original = {new: old for old, new in env.items()}
    count = 0
    for node in list(graph.nodes):
        old = original.get(node)
        if old is None:
            continue
        twin = _in_place_activation(node, modules)
        if twin is not None and aliases.reusable_by(_orig(node.args[0], original), old):
            fn, extra, kwargs = twin
            with graph.inserting_before(node):
                new = graph.call_function(fn, (node.args[0], *extra), kwargs)
            _replace(graph, node, new, old, original, aliases)
            count += 1
        elif _is_add(node):
            a, b = node.args
            for first, second in ((a, b), (b, a)):
                if aliases.reusable_by(_orig(first, original), old):
                    with graph.inserting_before(node):
                        new = graph.call_function(add_into, (first, second))
                    _replace(graph, node, new, old, original, aliases)
                    count += 1
                    break
    return graph, count


def _replace(graph: fx.Graph, node: fx.Node, new: fx.Node, old: fx.Node, original: dict[fx.Node, fx.Node],
             aliases: _Aliases) -> None:
    """``new`` (an in-place op) stands for ``node`` (``old`` in the model's graph) from now on."""
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    original[new] = old
    aliases.fresh.add(old)  # its output is the buffer it wrote into, which nothing else reads


def _orig(value: object, original: dict[fx.Node, fx.Node]) -> object:
    return original.get(value, value) if isinstance(value, fx.Node) else value


def _is_add(node: fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method"
                                                                    and node.target == "add")


def _reused_forward(gm: fx.GraphModule, build: bool = True) -> Callable | None:
    """``gm``'s forward with buffers reused, or None where nothing is rewritten; cached per graph code and the
    types and hooks of its modules."""
    key = (gm.code, tuple((name, type(m), _hooked(m)) for name, m in gm.named_modules()))
    cached = _CACHE.get(gm)
    if cached is not None and cached[0] == key:
        return cached[1]
    if not build:
        return None
    graph, count = reused_graph(gm)
    fn = None
    if count:
        code = graph.python_code(root_module="self")
        co_fields = gm.graph._co_fields if hasattr(gm.graph, "_co_fields") else {}
        fn = _forward_from_src(code.src, code.globals, co_fields)
    _CACHE[gm] = (key, fn)
    return fn


@contextlib.contextmanager
def reusing_buffers(model: nn.Module, build: bool = True) -> Iterator[None]:
    """While open, each GraphModule in ``model`` runs the forward of ``reused_graph`` (under ``no_grad`` only:
    with gradients on, or while global module hooks are set, nothing changes). ``build=False``: only where that
    forward is built already (one code generation per graph, which a single small batch would not repay)."""
    if torch.is_grad_enabled() or _global_hooks():
        yield
        return
    swapped = []
    for module in model.modules():
        if isinstance(module, fx.GraphModule) and "forward" not in vars(module):
            fn = _reused_forward(module, build)
            if fn is not None:
                module.forward = MethodType(fn, module)
                swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def _global_hooks() -> bool:
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks)
