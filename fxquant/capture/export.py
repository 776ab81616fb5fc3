"""Whole-graph capture through torch.export (non-strict) for models whose top-level code torch.fx cannot trace.

Hugging Face models (BertModel, DistilBERT, ViT, ...) build their attention masks and outputs with code that
symbolic tracing rejects, but ``torch.export.export(strict=False)`` runs that code in Python and records the
tensor ops. This module lowers the exported (pre-dispatch ATen) graph into an ``fx.GraphModule`` the pass
pipeline accepts:

- ``aten.linear`` / ``aten.conv*`` / ``aten.layer_norm`` / ``aten.embedding`` whose weight is a parameter of
  an ``nn.Linear`` / ``nn.Conv*`` / ``nn.LayerNorm`` / ``nn.Embedding`` (with the module's own settings) become
  ``call_module`` nodes of the model's own modules, so placement rules, weight quantizers and PTQ passes see
  them exactly as in a symbolically traced model;
- the common ATen ops become their torch-level functions (``aten.add.Tensor`` -> ``operator.add``, ...), so op
  kinds are the ones the rules speak; the rest stay ATen calls (kind "other");
- dropout in eval mode disappears; export's runtime assertions and guard call are dropped.

Shapes are exported dynamic (``Dim.AUTO``) where the model allows, so the captured graph accepts other
sequence lengths than the example's. The graph keeps export's pytree input/output handling: dict and
``ModelOutput`` results come back as the model returns them.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen

from fxquant.capture.inplace import mutated_arg

aten = torch.ops.aten

_FUNCTIONS: dict[object, object] = {
    aten.add.Tensor: operator.add, aten.mul.Tensor: operator.mul, aten.sub.Tensor: operator.sub,
    aten.div.Tensor: operator.truediv, aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm,
    aten.softmax.int: torch.softmax, aten.gelu.default: F.gelu, aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid, aten.relu.default: torch.relu, aten.silu.default: F.silu,
    aten.transpose.int: torch.transpose, aten.permute.default: torch.permute,
    aten.view.default: torch.reshape, aten.reshape.default: torch.reshape, aten._unsafe_view.default: torch.reshape,
    aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze, aten.flatten.using_ints: torch.flatten,
    aten.cat.default: torch.cat, aten.mean.dim: torch.mean, aten.linear.default: F.linear,
    aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
}
# the torch function that takes the ATen op's keyword arguments (alpha=) where an operator takes none
_KEYWORD_TWINS = {operator.add: torch.add, operator.sub: torch.sub, operator.mul: torch.mul,
                  operator.truediv: torch.div}
_DROPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default}
_IDENTITY = {aten.dropout.default, aten.contiguous.default, aten.clone.default, aten.alias.default}


def export_trace(model: nn.Module, values: tuple) -> tuple[fx.GraphModule | None, str | None]:
    """Capture ``model`` called with the positional ``values`` (every forward argument, in signature order):
    (GraphModule, None), or (None, why torch.export failed)."""
    dims = tuple({i: torch.export.Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None
                 for v in values)
    try:
        program = torch.export.export(model, values, dynamic_shapes=dims, strict=False)
    except Exception as exc:  # export raises many types; the caller falls back to partial tracing
        text = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {text[0] if text else ''}"
    if any(node.op == "call_function" and mutated_arg(node, {}) is not None for node in program.graph.nodes):
        program = program.run_decompositions({})  # in-place ops (x[:, :2] = 0 on a view): functional ATen
    gm = _lower(model, program.module())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, values, strict=False):
        if not isinstance(value, torch.Tensor) and isinstance(value, (bool, int, float, str, type(None))):
            node.args = (value,)  # callers may leave out arguments fixed at their example value
    gm.recompile()
    return gm, None


def _param_owner(node: object, modules: dict[str, nn.Module], exported: nn.Module) -> tuple[str, str] | None:
    """(module path, attribute name) of a get_attr node that reads a parameter of the model's module."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    path, _, attr = node.target.rpartition(".")
    module = modules.get(path)
    value = getattr(module, attr, None) if module is not None else None
    if not isinstance(value, torch.Tensor) or value is not _fetch(exported, node.target):
        return None
    return path, attr


def _fetch(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _as_module(node: fx.Node, modules: dict[str, nn.Module], exported: nn.Module) -> tuple[str, tuple] | None:
    """(module path, its call arguments) when an ATen call is exactly a call of one of the model's modules."""
    target, args, kwargs = node.target, node.args, node.kwargs
    if kwargs:
        return None
    if target is aten.linear.default:
        owner = _param_owner(args[1], modules, exported)
        if owner and isinstance(modules[owner[0]], nn.Linear) and owner[1] == "weight":
            module = modules[owner[0]]
            bias = args[2] if len(args) > 2 else None
            if (bias is None) == (module.bias is None) and (bias is None or _param_owner(bias, modules, exported)
                                                            == (owner[0], "bias")):
                return owner[0], (args[0],)
    if target is aten.layer_norm.default:
        owner = _param_owner(args[2] if len(args) > 2 else None, modules, exported)
        module = modules.get(owner[0]) if owner else None
        if isinstance(module, nn.LayerNorm) and len(args) > 4 and float(args[4]) == module.eps \
                and _param_owner(args[3], modules, exported) == (owner[0], "bias"):
            return owner[0], (args[0],)
    if target is aten.embedding.default:
        owner = _param_owner(args[0], modules, exported)
        module = modules.get(owner[0]) if owner else None
        if isinstance(module, nn.Embedding) and module.max_norm is None and len(args) <= 3 \
                and (args[2] if len(args) > 2 else -1) == (-1 if module.padding_idx is None else module.padding_idx):
            return owner[0], (args[1],)
    if target in (aten.conv1d.default, aten.conv2d.default):
        owner = _param_owner(args[1], modules, exported)
        module = modules.get(owner[0]) if owner else None
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and _conv_matches(module, args, modules, exported, owner[0]):
            return owner[0], (args[0],)
    return None


def _conv_matches(module: nn.Module, args: tuple, modules: dict, exported: nn.Module, path: str) -> bool:
    bias = args[2] if len(args) > 2 else None
    if (bias is None) != (module.bias is None):
        return False
    if bias is not None and _param_owner(bias, modules, exported) != (path, "bias"):
        return False
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    n = len(module.kernel_size)
    wanted = (tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)
    given = [*args[3:7]] + [None] * (7 - max(len(args), 3))
    defaults = ((1,) * n, (0,) * n, (1,) * n, 1)
    given = tuple(d if g is None else (tuple(g) if isinstance(g, (list, tuple)) else g)
                  for g, d in zip(given, defaults, strict=True))
    given = tuple(g * n if isinstance(g, tuple) and len(g) == 1 else g for g in given)
    return given == wanted


def _lower(model: nn.Module, exported: fx.GraphModule) -> fx.GraphModule:
    modules = dict(model.named_modules())
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    owners: dict[str, object] = {}
    for node in exported.graph.nodes:
        if node.op == "call_module" or (node.op == "call_function" and node.target in _DROPPED and not node.users):
            continue  # export's guard function and runtime assertions
        if node.op == "call_function" and node.target in _IDENTITY and len(node.args) >= 1 and not node.kwargs \
                and not (node.target is aten.dropout.default and len(node.args) > 2 and node.args[2]):
            env[node] = env[node.args[0]]
            continue
        as_module = _as_module(node, modules, exported) if node.op == "call_function" else None
        if as_module is not None:
            path, args = as_module
            owners[path] = modules[path]
            env[node] = graph.call_module(path, fx.map_arg(args, env.__getitem__))
            env[node].meta = dict(node.meta)
            continue
        new = graph.node_copy(node, env.__getitem__)
        if node.op == "call_function" and node.target in _FUNCTIONS:
            new.target = _FUNCTIONS[node.target]
            if node.kwargs and new.target in _KEYWORD_TWINS:  # sub(a, b, alpha=2): operators take no keywords
                new.target = _KEYWORD_TWINS[new.target]
            if node.target is aten.layer_norm.default:
                new.args = new.args[:5]
        if node.op == "get_attr":
            owners[node.target] = _fetch(exported, node.target)
        env[node] = new
    graph._codegen = _OutputTree(exported.graph._codegen.pytree_info)
    unused = [n for n in graph.nodes if n.op == "get_attr" and not n.users]
    for n in unused:
        graph.erase_node(n)
        owners.pop(n.target, None)
    gm = fx.GraphModule(owners, graph, type(model).__name__)
    gm._out_spec = exported._out_spec
    return gm


class _OutputTree(_PyTreeCodeGen):
    """Plain positional inputs (with defaults for fixed arguments); export's output tree (dicts, ModelOutput)."""

    def process_inputs(self, *inputs: object) -> tuple:
        return inputs

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)
