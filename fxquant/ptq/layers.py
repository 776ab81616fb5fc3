"""Shared plumbing of the data-driven passes: the quantized layers of a prepared model, a float mode, and
capturing one layer's input or output over calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxquant.capture import normalize_inputs
from fxquant.ops import node_kind
from fxquant.quantizer import TensorQuantizer


@dataclass
class Layer:
    name: str
    node: fx.Node | None  # None in a model that is not one traced graph
    module: nn.Module

    @property
    def quantizer(self) -> TensorQuantizer:
        return self.module.weight_quantizer

    @property
    def channel_dim(self) -> int:
        """Where the output channels are in the layer's output (Linear: last; convolutions: 1)."""
        return -1 if isinstance(self.module, nn.Linear) else 1


def quantized_layers(model: nn.Module) -> tuple[list[Layer], list[str]]:
    """Weighted layers with an active, calibrated weight quantizer, in graph order (module order for a model
    that is not one traced graph); plus notes on the ones left out and why."""
    modules = dict(model.named_modules())
    graph = getattr(model, "graph", None)
    if isinstance(graph, fx.Graph):
        calls = [(n.target, n) for n in graph.nodes if n.op == "call_module"]
    else:
        calls = [(name, None) for name in modules]
    sites: dict[str, int] = {}
    for name, _ in calls:
        sites[name] = sites.get(name, 0) + 1
    layers, notes, seen = [], [], set()
    for name, node in calls:
        q = getattr(modules[name], "weight_quantizer", None)
        if not isinstance(q, TensorQuantizer) or name in seen:
            continue
        seen.add(name)
        if q.mode == "disabled":
            notes.append(f"`{name}`: its weight quantizer is disabled")
        elif not q.is_calibrated:
            notes.append(f"`{name}`: its weight quantizer has no range (calibrate first)")
        elif sites[name] > 1:
            notes.append(f"`{name}`: called at {sites[name]} places; its weight serves several inputs")
        else:
            layers.append(Layer(name, node, modules[name]))
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
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
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


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, batches: Sequence, what: str, limit: int | None = None,
            reduce=None) -> list[torch.Tensor]:
    """``module``'s input (``what="input"``) or output per batch, stopping the forward right after it.

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

    if what == "input":
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, result: keep(result))
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            try:
                model(*normalize_inputs(batch))
            except _Stop:
                pass
    finally:
        handle.remove()
    return out


def channel_sum(channel_dim: int):
    """A ``reduce`` for ``capture``: (sum over all but the channel axis, number of values summed)."""
    def reduce(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        t = t.detach().double().movedim(channel_dim, -1)
        flat = t.reshape(-1, t.shape[-1])
        return flat.sum(0), flat.shape[0]
    return reduce
