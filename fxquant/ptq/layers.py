"""Shared plumbing of the data-driven passes: the quantized layers of a prepared model, a float mode, and
capturing one layer's input or output over calibration batches."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import fx, nn

from fxquant.calib.reuse import transient
from fxquant.capture.trace import normalize_inputs
from fxquant.ops.kinds import FUNCTION_KINDS, WEIGHTED_KINDS, WeightedOp, module_kind, node_kind, quantized_weight_op
from fxquant.quantizer import TensorQuantizer, quantizers_of


@dataclass
class Layer:
    """A weighted op of a prepared model with an active weight quantizer: a quantized module (``module``), or a
    functional ``F.conv*``/``F.linear`` node whose weight goes through a quantizer module (``op``)."""

    name: str
    node: fx.Node | None  # None in a model that is not one traced graph
    module: nn.Module | None = None
    op: WeightedOp | None = None
    quantizer_path: str = ""

    @property
    def kind(self) -> str:
        return self.op.kind if self.op is not None else module_kind(self.module)

    @property
    def groups(self) -> int:
        return self.op.groups if self.op is not None else getattr(self.module, "groups", 1)

    @property
    def weight(self) -> torch.Tensor:
        return self.op.weight if self.op is not None else self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.op.bias if self.op is not None else self.module.bias

    @property
    def quantizer(self) -> TensorQuantizer:
        return self.op.gm.get_submodule(self.quantizer_path) if self.op is not None else self.module.weight_quantizer

    @quantizer.setter
    def quantizer(self, quantizer: nn.Module) -> None:
        if self.op is not None:
            self.op.gm.set_submodule(self.quantizer_path, quantizer)
        else:
            self.module.weight_quantizer = quantizer

    @property
    def channel_dim(self) -> int:
        """Where the output channels are in the layer's output (Linear: last; convolutions: 1)."""
        return -1 if self.kind == "linear" else 1

    def ensure_bias(self) -> torch.Tensor:
        """The layer's bias, created as zeros when it has none."""
        if self.bias is None:
            w = self.weight
            out = w.shape[1] * self.groups if self.kind == "conv_transpose" else w.shape[0]
            zeros = torch.zeros(out, dtype=w.dtype, device=w.device)
            if self.op is not None:
                self.op.write(bias=zeros)
                self.op.gm.recompile()
            else:
                self.module.bias = nn.Parameter(zeros)
        return self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer alone on input ``x`` (its weight through its current quantizer)."""
        if self.op is None:
            return self.module(x)
        node = self.node
        args = (x, self.quantizer(self.weight), self.bias, *node.args[3:])
        return node.target(*args, **{k: v for k, v in node.kwargs.items() if k not in ("weight", "bias")})


def _functional_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | str | None:
    """A functional weighted op whose weight argument is a weight quantizer of a parameter
    (``fxquant.ops.kinds.quantized_weight_op``), as a Layer; a reason when its weight or bias cannot be rewritten."""
    op = quantized_weight_op(gm, node)
    q = node.args[1] if len(node.args) > 1 else None
    quantizer = gm.get_submodule(q.target) if op is not None and isinstance(q, fx.Node) else None
    if not isinstance(quantizer, TensorQuantizer) or not quantizer.constant:
        return None
    weight = q.args[0]
    readers = [u for u in weight.users if u is not q] + [u for u in q.users if u is not node]
    if readers:
        return f"`{node.name}`: its weight is shared with {', '.join(f'`{u.name}`' for u in readers[:3])}"
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if any(isinstance(a, fx.Node) for a in (*node.args[3:], *node.kwargs.values())) or \
            (bias is not None and getattr(bias, "op", None) != "get_attr"):
        return f"`{node.name}`: its bias or other arguments are computed tensors"
    op = replace(op, bias_name=bias.target.rpartition(".")[2] if bias is not None else None)
    return Layer(node.name, node, op=op, quantizer_path=q.target)


def input_module(model: nn.Module, layer: Layer) -> tuple[str, nn.Module] | None:
    """The module whose call in the graph produces ``layer``'s input (usually its input quantizer), with its
    name; None when the input comes from anything else."""
    source = layer.node.args[0] if layer.node is not None and layer.node.args else None
    if isinstance(source, fx.Node) and source.op == "call_module":
        return source.target, model.get_submodule(source.target)
    return None


def input_tap(gm: fx.GraphModule, layer: Layer, calls: Counter) -> tuple[nn.Module, str] | None:
    """Where a forward hook can read ``layer``'s input: the layer's module itself (``"input"``: a pre-hook), or
    the module called once that produces its input, usually its input quantizer (``"output"``: a hook); None when
    neither is called exactly once. ``calls``: how often each module target is called in ``gm``'s graph."""
    if layer.module is not None and calls[layer.node.target] == 1:
        return layer.module, "input"
    source = input_module(gm, layer)
    return (source[1], "output") if source is not None and calls[source[0]] == 1 else None


Tap = tuple[nn.Module, str, Layer]  # (module to hook, "input" (pre-hook) or "output" (hook), the layer)


def input_taps(gm: fx.GraphModule, unsupported: Callable[[Layer], str | None],
               left: Callable[[str], str]) -> tuple[list[Tap], list[str]]:
    """Where a hook can read the input of each quantized layer of ``gm`` (calibrated or not: for a step that taps
    the ranges pass) that ``unsupported(layer)`` (a reason, or None) allows; and notes on the others:
    ``quantized_layers``' own, then ``"`name`: " + left(why)`` per layer left."""
    layers, notes = quantized_layers(gm, calibrated=False)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    taps, skipped = [], list(notes)
    for layer in layers:
        why = unsupported(layer)
        tap = None if why else input_tap(gm, layer, calls)
        if why or tap is None:
            skipped.append(f"`{layer.name}`: {left(why or 'its input is not read by a module called once')}")
        else:
            taps.append((*tap, layer))
    return taps, skipped


def hook_inputs(taps: list[Tap], seen: Callable[[Layer, torch.Tensor], None]) -> list:
    """Register hooks calling ``seen(layer, input)`` on every forward for each tap; returns the handles. ``seen``
    must not keep the tensor (it may be overwritten afterwards: the ranges pass runs element-wise ops in place)."""
    def on_input(layer: Layer, _module: nn.Module, args: tuple) -> None:
        seen(layer, args[0])

    def on_output(layer: Layer, _module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        seen(layer, out)

    return [module.register_forward_pre_hook(transient(partial(on_input, layer))) if where == "input"
            else module.register_forward_hook(transient(partial(on_output, layer))) for module, where, layer in taps]


def pair(value: int | str | Sequence) -> tuple:
    """A conv argument as one value per spatial axis (2-D): ``3 -> (3, 3)``, ``"same" -> ("same", "same")``."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_args(layer: Layer) -> tuple:
    """A conv layer's (stride, padding, dilation), from its module or its functional call."""
    if layer.module is not None:
        m = layer.module
        return m.stride, m.padding, m.dilation
    args, kwargs = layer.node.args, layer.node.kwargs
    return tuple(args[i] if len(args) > i else kwargs.get(name, default)
                 for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))


def quantized_layers(model: nn.Module, calibrated: bool = True) -> tuple[list[Layer], list[str]]:
    """Weighted layers with an active weight quantizer, calibrated unless ``calibrated=False`` (a step that taps
    the ranges pass), in graph order (module order for a model that is not one traced graph); plus notes on the
    ones left out and why."""
    modules = dict(model.named_modules())
    graph = getattr(model, "graph", None)
    candidates: list[Layer | str] = []
    if isinstance(graph, fx.Graph):
        for n in graph.nodes:
            if n.op == "call_module":
                candidates.append(Layer(n.target, n, modules[n.target]))
            elif n.op == "call_function" and n.target in FUNCTION_KINDS and node_kind(n, {}) in WEIGHTED_KINDS:
                found = _functional_layer(model, n)
                if found is not None:
                    candidates.append(found)
    else:
        candidates = [Layer(name, None, module) for name, module in modules.items()]
    sites: dict[str, int] = {}
    for c in candidates:
        if isinstance(c, Layer) and c.module is not None:
            sites[c.name] = sites.get(c.name, 0) + 1
    layers, notes, seen = [], [], set()
    for c in candidates:
        if isinstance(c, str):
            notes.append(c)
            continue
        q = getattr(c.module, "weight_quantizer", None) if c.op is None else c.quantizer
        if not isinstance(q, TensorQuantizer) or c.name in seen:
            continue
        seen.add(c.name)
        if q.mode == "disabled":
            notes.append(f"`{c.name}`: its weight quantizer is disabled")
        elif calibrated and not q.is_calibrated:
            notes.append(f"`{c.name}`: its weight quantizer has no range (calibrate first)")
        elif sites.get(c.name, 1) > 1:
            notes.append(f"`{c.name}`: called at {sites[c.name]} places; its weight serves several inputs")
        else:
            layers.append(c)
    return layers, notes


def followed_by_relu(model: nn.Module, node: fx.Node | None) -> bool:
    """True when ``node``'s only consumer (looking through quantizers) is a ReLU."""
    if node is None:
        return False
    modules = dict(model.named_modules())
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "call_module" and isinstance(modules[node.target], TensorQuantizer):
            continue
        return node_kind(node, modules) == "relu"
    return False


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Every quantizer passes its input through (the float model with the current parameters)."""
    with disabled(list(quantizers_of(model).values())):
        yield


@contextlib.contextmanager
def disabled(quantizers: list[TensorQuantizer]) -> Iterator[None]:
    """``quantizers`` pass their inputs through, then get their modes back."""
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.set_mode("disabled")
    try:
        yield
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.set_mode(mode)


class _Stop(Exception):
    pass


class _Tap(fx.Interpreter):
    """Runs a GraphModule node by node and hands ``node``'s input or output to ``keep``."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, what: str, keep) -> None:
        super().__init__(gm)
        self.node, self.what, self.keep = node, what, keep

    def run_node(self, n: fx.Node) -> object:
        if n is self.node and self.what == "input":
            self.keep(self.env[n.args[0]])
        result = super().run_node(n)
        if n is self.node:
            self.keep(result)
        return result


@torch.no_grad()
def layer_activations(model: nn.Module, layer: Layer | nn.Module, batches: Sequence, what: str,
                      limit: int | None = None, reduce=None) -> list[torch.Tensor]:
    """The input (``what="input"``) or output of ``layer`` (a Layer or a module) per batch, stopping the forward
    right after it.

    With ``reduce``, each captured tensor is replaced by ``reduce(tensor)`` (e.g. a per-channel sum), so
    nothing large is kept. At most ``limit`` samples are kept.
    """
    out: list[torch.Tensor] = []
    seen = 0

    def keep(t: torch.Tensor) -> None:
        nonlocal seen
        if limit is not None:
            t = t[: max(limit - seen, 0)]
        seen += t.shape[0]
        out.append(reduce(t) if reduce is not None else t.detach().clone())
        raise _Stop

    functional = isinstance(layer, Layer) and layer.op is not None
    module = layer.module if isinstance(layer, Layer) else layer
    handle = None
    if functional:
        run = _Tap(model, layer.node, what, keep).run
    else:
        run = model
        if what == "input":
            handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
        else:
            handle = module.register_forward_hook(lambda m, args, result: keep(result))
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            try:
                run(*normalize_inputs(batch))
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    return out


def channel_sum(channel_dim: int):
    """A ``reduce`` for ``layer_activations``: (sum over all but the channel axis, number of values summed)."""
    def reduce(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        t = t.detach().double().movedim(channel_dim, -1)
        flat = t.reshape(-1, t.shape[-1])
        return flat.sum(0), flat.shape[0]
    return reduce
