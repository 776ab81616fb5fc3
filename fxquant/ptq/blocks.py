"""Blocks of a traced model for reconstruction (BRECQ, Li et al. 2021): the graph cut where few tensors cross.

A *cut* after a node is where the rest of the graph reads only tensors computed so far; it is usable when each
of those tensors holds one row per sample (its first dimension is the batch), so a block can run on any subset
of samples. Data nodes are those that depend on the model inputs; the others (weights, their quantizers,
constants) are recomputed inside each block that reads them.

- ``granularity="layer"``: one block per quantized layer (AdaRound's per-layer objective), cut at every usable
  cut; a stretch with no quantized layer joins the block before it.
- ``granularity="block"``: cut where one tensor crosses (around each residual unit), then join the stretches
  whose first layer lies in the same module at the depth where the model's residual units are defined
  (``nn_module_stack``): MobileNetV2's ``features.2`` (no residual) is one block like ``features.3`` (residual).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from fxquant.ptq.layers import Layer


@dataclass
class Block:
    """Consecutive data nodes of a graph: what they read from earlier blocks (``inputs``: nodes), what later
    blocks or the graph output read from them (``outputs``), and the quantized layers among them."""

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)


def data_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes that depend on a placeholder (the model's inputs), in graph order, placeholders first."""
    data: set[fx.Node] = set()
    order = []
    for n in graph.nodes:
        if n.op == "placeholder" or (n.op != "output" and any(a in data for a in n.all_input_nodes)):
            data.add(n)
            order.append(n)
    return order


ROWS, BATCH = "rows", "batch"


def probe(gm: fx.GraphModule, samples: Sequence[torch.Tensor]) -> dict[fx.Node, object]:
    """How each data node's value depends on the number of samples, from runs on 2 and 3 of ``samples``
    (fewer when there are fewer): ``ROWS`` for a tensor with one row per sample, ``BATCH`` for the sample count
    itself (``x.size(0)``), ``("const", value)`` for another value that does not change with it; absent otherwise
    (a block boundary cannot cut such a value)."""
    n = samples[0].shape[0]
    counts = sorted({min(2, n), min(3, n)})
    runs = [_values(gm, tuple(x[:k] for x in samples)) for k in counts]
    kinds: dict[fx.Node, object] = {}
    for node in runs[0]:
        values = [run[node] for run in runs]
        if all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == k for v, k in zip(values, counts,
                                                                                           strict=True)):
            kinds[node] = ROWS
        elif all(isinstance(v, int) and not isinstance(v, bool) and v == k for v, k in zip(values, counts,
                                                                                         strict=True)):
            kinds[node] = BATCH
        elif all(isinstance(v, (int, float, bool, str, type(None))) and v == values[0] for v in values):
            kinds[node] = ("const", values[0])
    return kinds


def _values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, object]:
    """Every node's value on ``inputs`` (tensors by shape only: kept as empty tensors of that shape)."""
    seen: dict[fx.Node, object] = {}

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            value = super().run_node(n)
            seen[n] = value.new_empty(value.shape) if isinstance(value, torch.Tensor) else value
            return value

    with torch.no_grad():
        Probe(gm).run(*inputs)
    return seen


def find_blocks(gm: fx.GraphModule, layers: list[Layer], granularity: str,
                kinds: dict[fx.Node, object]) -> list[Block]:
    """The blocks of ``gm`` in graph order (every data node in exactly one); ``kinds``: ``probe``'s. A block may
    hold no layer only when the graph has none."""
    order = data_nodes(gm.graph)
    index = {n: i for i, n in enumerate(order)}
    last_use = {n: max([index.get(u, len(order)) for u in n.users], default=index[n]) for n in order}
    layer_at = {layer.node: layer for layer in layers if layer.node in index}
    cuts = []  # (position, live values) after each non-placeholder data node where every live value has rows
    live: set[fx.Node] = {n for n in order if n.op == "placeholder"}
    for i, n in enumerate(order):
        live.add(n)
        live = {v for v in live if last_use[v] > i}
        if n.op != "placeholder" and live and all(v in kinds for v in live):
            cuts.append((i, sum(1 for v in live if kinds[v] == ROWS)))
    if granularity == "layer":
        bounds = [i for i, _ in cuts]
    else:
        bounds = [i for i, width in cuts if width == 1]
    stretches = _with_layers(_split(order, bounds), layer_at)
    if granularity == "block":
        stretches = _join_by_module(stretches, layer_at)
    return [_block(part, layer_at, index, last_use, kinds) for part in stretches]


def _split(order: list[fx.Node], bounds: list[int]) -> list[list[fx.Node]]:
    """``order`` without its placeholders, cut after each position in ``bounds``."""
    out, start = [], 0
    for b in [*bounds, len(order) - 1]:
        part = [n for n in order[start:b + 1] if n.op != "placeholder"]
        if part:
            out.append(part)
        start = b + 1
    return out


def _with_layers(stretches: list[list[fx.Node]], layer_at: dict[fx.Node, Layer]) -> list[list[fx.Node]]:
    """Each stretch without a quantized layer joined to the one before it (the first ones: to the next)."""
    merged: list[list[fx.Node]] = []
    pending: list[fx.Node] = []
    for part in stretches:
        if any(n in layer_at for n in part):
            merged.append(pending + part)
            pending = []
        elif merged:
            merged[-1] = merged[-1] + part
        else:
            pending += part
    if pending:
        merged.append(pending)
    return merged


def _stack(n: fx.Node) -> list[str]:
    return list((n.meta.get("nn_module_stack") or {}).keys())


def _join_by_module(stretches: list[list[fx.Node]], layer_at: dict[fx.Node, Layer]) -> list[list[fx.Node]]:
    """Join consecutive stretches whose first layers sit in the same module at the depth of the modules that
    hold a residual unit (the common module of a stretch with several layers, most often)."""
    depths = Counter()
    for part in stretches:
        stacks = [_stack(n) for n in part if n in layer_at]
        if len(stacks) > 1 and all(stacks):
            common = 0
            while all(len(s) > common and s[common] == stacks[0][common] for s in stacks):
                common += 1
            if common:
                depths[common] += 1
    if not depths:
        return stretches
    depth = depths.most_common(1)[0][0]
    out: list[list[fx.Node]] = []
    keys: list[tuple | None] = []
    for part in stretches:
        first = _stack(next(n for n in part if n in layer_at)) if any(n in layer_at for n in part) else []
        key = tuple(first[:depth]) if len(first) >= depth else None
        if out and key is not None and keys[-1] == key:
            out[-1] = out[-1] + part
        else:
            out.append(part)
            keys.append(key)
    return out


def _block(part: list[fx.Node], layer_at: dict[fx.Node, Layer], index: dict[fx.Node, int],
           last_use: dict[fx.Node, int], kinds: dict[fx.Node, object]) -> Block:
    inside, last = set(part), index[part[-1]]
    inputs = sorted({a for n in part for a in n.all_input_nodes if a in index and a not in inside},
                    key=index.__getitem__)
    outputs = [n for n in part if last_use[n] > last and kinds[n] == ROWS]  # others are recomputed or known
    layers = [layer_at[n] for n in part if n in layer_at]
    return Block(_common_module(layers) or (_path(layers[0]) if layers else part[0].name), part, inputs, outputs,
                 layers)


def _common_module(layers: list[Layer]) -> str:
    """The module path all the layers sit in (their weights' owners), or ''."""
    paths = [_path(layer).split(".") for layer in layers]
    if len(paths) < 2:
        return ""
    common = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _path(layer: Layer) -> str:
    """The module path of the layer's weight owner (a functional layer's node name says less)."""
    return layer.op.path if layer.op is not None and layer.op.path else layer.name


def block_module(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A GraphModule computing ``block``: its inputs as placeholders (in ``block.inputs`` order), its outputs as
    one tuple; constant nodes it reads are recomputed inside. It shares every module and parameter with ``gm``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(n.name) for n in block.inputs}

    def copy(n: fx.Node) -> fx.Node:
        if n not in env:
            for a in n.all_input_nodes:
                copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        return env[n]

    for n in block.nodes:
        copy(n)
    graph.output(tuple(env[n] for n in block.outputs))
    return fx.GraphModule(gm, graph)
