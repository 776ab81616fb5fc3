"""Op-kind table: nn modules, torch functions and Tensor methods mapped to canonical kinds.

Rules and passes speak in kinds ("conv", "add", "relu", ...), so ``nn.ReLU``, ``F.relu``, ``torch.relu`` and
``x.relu()`` are one thing to them. Unknown ops get the kind ``"other"``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import fx, nn
from torch.nn.utils import parametrize
from torchvision.models import swin_transformer

from fxquant.ops.attention import masked_softmax
from fxquant.ops.quant_modules import QUANTIZED_TYPES

MODULE_KINDS: dict[type, str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose", nn.ConvTranspose2d: "conv_transpose", nn.ConvTranspose3d: "conv_transpose",
    nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh",
    nn.MaxPool1d: "max_pool", nn.MaxPool2d: "max_pool", nn.MaxPool3d: "max_pool",
    nn.AdaptiveMaxPool1d: "max_pool", nn.AdaptiveMaxPool2d: "max_pool", nn.AdaptiveMaxPool3d: "max_pool",
    nn.AvgPool1d: "avg_pool", nn.AvgPool2d: "avg_pool", nn.AvgPool3d: "avg_pool",
    nn.AdaptiveAvgPool1d: "avg_pool", nn.AdaptiveAvgPool2d: "avg_pool", nn.AdaptiveAvgPool3d: "avg_pool",
    nn.Flatten: "reshape", nn.Identity: "identity", nn.Dropout: "identity", nn.Dropout2d: "identity",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.GELU: "gelu", nn.Tanh: "tanh", nn.Softmax: "softmax", nn.LayerNorm: "layer_norm",
    nn.ZeroPad1d: "pad", nn.ZeroPad2d: "pad", nn.ZeroPad3d: "pad",
    nn.ConstantPad1d: "pad", nn.ConstantPad2d: "pad", nn.ConstantPad3d: "pad",
}

FUNCTION_KINDS: dict[object, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat",
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.adaptive_max_pool2d: "max_pool",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool", F.adaptive_avg_pool3d: "avg_pool",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
    F.conv_transpose1d: "conv_transpose", F.conv_transpose2d: "conv_transpose", F.conv_transpose3d: "conv_transpose",
    F.dropout: "identity",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu",
    F.softmax: "softmax", torch.softmax: "softmax", F.layer_norm: "layer_norm",
    F.hardsigmoid: "hardsigmoid", torch.tanh: "tanh", torch.mean: "mean",
    torch.einsum: "matmul",  # the exporter lowers a two-operand einsum to (batched) MatMul
    torch.transpose: "permute", torch.permute: "permute", torch.swapaxes: "permute",
    torch.chunk: "split", torch.split: "split", torch.unbind: "split", operator.getitem: "getitem",
    torch.stack: "cat",
    # StochasticDepth is the identity in eval mode, which prepare() traces in
    torchvision.ops.stochastic_depth: "identity",
    F.pad: "pad", swin_transformer._patch_merging_pad: "pad", torch.roll: "roll",
    # torchvision wraps it with torch.fx.wrap: one opaque call holding Linear layers and attention matmuls
    swin_transformer.shifted_window_attention: "window_attention",
    swin_transformer._get_relative_position_bias: "position_bias",  # a gather from parameters only
    masked_softmax: "masked_softmax",  # decomposed attention's mask + softmax (fxquant.passes.decompose_sdpa)
}

METHOD_KINDS: dict[str, str] = {
    "add": "add", "add_": "add", "__add__": "add", "mul": "mul", "mul_": "mul",
    "relu": "relu", "relu_": "relu",
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "squeeze": "reshape", "unsqueeze": "reshape",
    "contiguous": "identity", "permute": "permute", "transpose": "permute",
    "matmul": "matmul", "bmm": "matmul", "sigmoid": "sigmoid", "softmax": "softmax", "mean": "mean",
    "swapaxes": "permute", "expand": "reshape", "unflatten": "reshape",
    "chunk": "split", "split": "split", "unbind": "split",
}

WEIGHTED_KINDS = frozenset({"conv", "conv_transpose", "linear"})
"""Kinds whose module form carries a weight to quantize."""

# Output-channel axis of the weight for each weighted module kind.
WEIGHT_AXIS = {"conv": 0, "conv_transpose": 1, "linear": 0}


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The canonical kind of an FX node ("placeholder", "output", "constant" or an op kind)."""
    if node.op == "placeholder":
        return "placeholder"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "constant"
    if node.op == "call_module":
        return module_kind(modules[node.target])
    if node.op == "call_function":
        return FUNCTION_KINDS.get(node.target, "other")
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, "other")
    return "other"


def module_kind(module: nn.Module) -> str:
    """Kind of a module, by exact type first, then by the nearest known base class."""
    kind = MODULE_KINDS.get(type(module))
    if kind is not None:
        return kind
    for base in type(module).__mro__[1:]:
        if base in MODULE_KINDS:
            return MODULE_KINDS[base]
    return "other"


# ---- weighted ops: the one definition every pass uses ---------------------------------------------------
# functional weighted ops: kind, and the positional index of their ``groups`` and ``padding`` arguments
_FUNCTIONAL: dict[object, tuple[str, int | None, int | None]] = {
    F.conv1d: ("conv", 6, 4), F.conv2d: ("conv", 6, 4), F.conv3d: ("conv", 6, 4),
    F.conv_transpose1d: ("conv_transpose", 6, 4), F.conv_transpose2d: ("conv_transpose", 6, 4),
    F.conv_transpose3d: ("conv_transpose", 6, 4), F.linear: ("linear", None, None),
}
_MODULE_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear)


@dataclass
class WeightedOp:
    """A Conv / ConvTranspose / Linear in the graph, as a module call (any subclass) or a functional call whose
    weight (and bias) are ``get_attr`` parameters: where its weight and bias live and how to write them back.

    ``owner`` holds the tensors as attributes ``weight_name`` / ``bias_name`` (``bias_name`` None: no bias yet);
    ``path`` is the owner's qualified name in the GraphModule ("" for the root)."""

    node: fx.Node
    kind: str
    gm: fx.GraphModule
    path: str
    weight_name: str
    bias_name: str | None
    groups: int
    pads_inside: bool = False  # a module subclass that pads in its forward (not visible in the graph)

    @property
    def name(self) -> str:
        """How reports name the op: the module's path, or the node's name for a functional call."""
        return self.node.target if self.node.op == "call_module" else self.node.name

    @property
    def owner(self) -> nn.Module:
        return self.gm.get_submodule(self.path)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.weight_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.owner, self.bias_name) if self.bias_name is not None else None

    @property
    def axis(self) -> int:
        """The output-channel axis of the weight."""
        return WEIGHT_AXIS[self.kind]

    @property
    def out_channels(self) -> int:
        w = self.weight
        return w.shape[1] * self.groups if self.kind == "conv_transpose" else w.shape[0]

    @property
    def in_channels(self) -> int:
        w = self.weight
        return w.shape[0] if self.kind == "conv_transpose" else w.shape[1] * self.groups

    @property
    def padding(self) -> object:
        """The op's own ``padding`` argument (0 for Linear)."""
        if self.kind == "linear":
            return 0
        if self.node.op == "call_module":
            return self.gm.get_submodule(self.node.target).padding
        return _arg(self.node, _FUNCTIONAL[self.node.target][2], "padding", 0)

    def write(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Replace the weight and/or bias by new parameters (a missing bias is created). The owner module is
        copied first, so a module shared with the caller's model is never changed."""
        owner = self.owned()
        grad = self.weight.requires_grad
        if weight is not None:
            setattr(owner, self.weight_name, nn.Parameter(weight.detach().clone(), requires_grad=grad))
        if bias is not None:
            new_bias = nn.Parameter(bias.detach().clone().to(self.weight.dtype), requires_grad=grad)
            if self.bias_name is None:
                self._add_bias(owner, new_bias)
            else:
                setattr(owner, self.bias_name, new_bias)

    def owned(self) -> nn.Module:
        """The owner module, replaced in the GraphModule by a copy of itself (same tensors, own attribute dicts)."""
        owner = self.owner
        if self.path == "":
            return owner
        twin = copy.copy(owner)
        for key in ("_parameters", "_buffers", "_modules"):
            twin.__dict__[key] = dict(owner.__dict__[key])
        self.gm.set_submodule(self.path, twin)
        return twin

    def _add_bias(self, owner: nn.Module, bias: nn.Parameter) -> None:
        if self.node.op == "call_module" or (self.path and getattr(owner, "bias", None) is None):
            self.bias_name = "bias"  # a free name, or a registered ``bias = None`` slot (Conv2d(bias=False))
        else:
            self.bias_name = _free_attr(owner, f"{self.weight_name}_bias")
        setattr(owner, self.bias_name, bias)
        if self.node.op == "call_function":
            with self.gm.graph.inserting_before(self.node):
                getter = self.gm.graph.get_attr(f"{self.path}.{self.bias_name}" if self.path else self.bias_name)
            _set_arg(self.node, 2, "bias", getter)

    def set_padding(self, padding: tuple[int, ...]) -> None:
        """Set the functional op's ``padding`` argument."""
        _set_arg(self.node, _FUNCTIONAL[self.node.target][2], "padding", padding)


def _arg(node: fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, index: int, name: str, value: object) -> None:
    if len(node.args) > index:
        node.update_arg(index, value)
    elif len(node.args) == index and name not in node.kwargs:
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


def _free_attr(module: nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(module, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _split(target: str) -> tuple[str, str]:
    path, _, attr = target.rpartition(".")
    return path, attr


def weighted_ops(gm: fx.GraphModule) -> tuple[dict[fx.Node, WeightedOp], dict[fx.Node, str]]:
    """Every weighted op of ``gm`` whose weights a pass may rewrite, and the ones it may not, with the reason
    (shared weights, computed weights, subclasses whose forward fxquant cannot read)."""
    readers = _weight_readers(gm)
    ops: dict[fx.Node, WeightedOp] = {}
    declined: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        found = _weighted_op(gm, node)
        if found is None:
            continue
        if isinstance(found, str):
            declined[node] = found
            continue
        shared = [r for r in readers.get(id(found.weight), []) if r is not node]
        if found.bias is not None:
            shared += [r for r in readers.get(id(found.bias), []) if r is not node and r not in shared]
        if shared:
            declined[node] = (f"its weight is shared with {', '.join(f'`{r.name}`' for r in shared[:3])}: "
                              "rewriting it would change every op that reads it")
            continue
        ops[node] = found
    return ops, declined


def _weight_readers(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """Which op nodes read each parameter (by identity): module calls, and users of ``get_attr`` nodes."""
    readers: dict[int, list[fx.Node]] = {}

    def add(tensor: object, node: fx.Node) -> None:
        if isinstance(tensor, torch.Tensor):
            readers.setdefault(id(tensor), []).append(node)

    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(node.target).parameters():
                add(p, node)
        elif node.op == "get_attr":
            tensor = _getattr_or_none(gm, node.target)
            for user in node.users:
                add(tensor, user)
    return readers


def _getattr_or_none(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def parameter_arg(gm: fx.GraphModule, node: fx.Node, role: str = "weight") -> fx.Node | None:
    """The ``get_attr`` node a functional weighted op reads its ``role`` ("weight" or "bias") from, or None when
    that argument is computed (or absent)."""
    value = _arg(node, 1 if role == "weight" else 2, role, None)
    if isinstance(value, fx.Node) and value.op == "get_attr" and \
            isinstance(_getattr_or_none(gm, value.target), torch.Tensor):
        return value
    return None


def quantized_weight_op(gm: fx.GraphModule, node: fx.Node) -> WeightedOp | None:
    """A functional weighted op of a prepared graph whose weight argument is a module call (its weight quantizer)
    on a ``get_attr`` tensor, as a WeightedOp owning that tensor (its bias not tracked); else None."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL:
        return None
    q = _arg(node, 1, "weight", None)
    if not isinstance(q, fx.Node) or q.op != "call_module" or not q.args or \
            getattr(q.args[0], "op", None) != "get_attr":
        return None
    kind, groups_index, _ = _FUNCTIONAL[node.target]
    path, name = _split(q.args[0].target)
    groups = _arg(node, groups_index, "groups", 1) if groups_index is not None else 1
    return WeightedOp(node, kind, gm, path, name, None, int(groups))


def _weighted_op(gm: fx.GraphModule, node: fx.Node) -> WeightedOp | str | None:
    """The node as a WeightedOp; a reason when it is a weighted op whose weights cannot be rewritten; None when it
    is not a weighted op."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = module_kind(module)
        if kind not in WEIGHTED_KINDS or not isinstance(module, _MODULE_BASES):
            return None
        reason, pads = _module_form(module)
        if reason is not None:
            return f"`{node.target}` ({type(module).__name__}): {reason}"
        return WeightedOp(node, kind, gm, node.target, "weight", "bias" if module.bias is not None else None,
                          getattr(module, "groups", 1), pads)
    if node.op != "call_function" or node.target not in _FUNCTIONAL:
        return None
    kind, groups_index, _ = _FUNCTIONAL[node.target]
    weight, bias = _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
    for role in ("weight", "bias"):
        if parameter_arg(gm, node, role) is None and (role == "weight" or bias is not None):
            return f"`{node.name}` takes its {role} from a computed tensor, not a parameter"
    path, weight_name = _split(weight.target)
    if bias is not None and _split(bias.target)[0] != path:
        return f"`{node.name}` reads its weight and bias from different modules"
    groups = _arg(node, groups_index, "groups", 1) if groups_index is not None else 1
    if not isinstance(groups, int):
        return f"`{node.name}` has a computed `groups` argument"
    return WeightedOp(node, kind, gm, path, weight_name, _split(bias.target)[1] if bias is not None else None,
                      groups)


def _module_form(module: nn.Module) -> tuple[str | None, bool]:
    """(None, pads) when ``module`` computes exactly its base class's op on ``weight``/``bias`` (after an optional
    zero pad of its input: ``pads``), else (the reason, False)."""
    if parametrize.is_parametrized(module) or module._forward_pre_hooks or module._forward_hooks:
        return "its weight is computed (a parametrization such as weight_norm, or a forward hook)", False
    base = next(b for b in type(module).__mro__ if b in _MODULE_BASES)
    if type(module) in QUANTIZED_TYPES:
        return None, False  # fxquant's own twins: the base op on the quantized weight
    if type(module).forward is base.forward and getattr(type(module), "_conv_forward", None) is \
            getattr(base, "_conv_forward", None):
        return None, False
    try:
        graph = fx.Tracer().trace(module)
    except Exception as exc:  # torch.fx raises many types; any of them means "cannot read this forward"
        return f"its forward cannot be traced to see how it uses its weight ({type(exc).__name__})", False
    return _plain_forward(graph)


def _plain_forward(graph: fx.Graph) -> tuple[str | None, bool]:
    """Whether a traced subclass forward is ``[zero pad ->] weighted op(x, self.weight, self.bias)``."""
    why = ("its forward does more than one convolution/linear of `self.weight` and `self.bias` (after an optional "
           "zero pad); fxquant traces into such subclasses unless they are listed in leaf_modules")
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    if not ops or ops[-1].target not in _FUNCTIONAL or next(iter(ops[-1].users)).op != "output":
        return why, False
    op, pads = ops[-1], ops[:-1]
    if any(p.target is not F.pad or _arg(p, 3, "value", 0) not in (0, None, 0.0) or
           _arg(p, 2, "mode", "constant") != "constant" for p in pads):
        return why, False
    getters = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    if _arg(op, 1, "weight", None) is not getters.get("weight") or \
            _arg(op, 2, "bias", None) not in (None, getters.get("bias")) or set(getters) - {"weight", "bias"}:
        return why, False
    return None, bool(pads)
