"""Keep an attention mask added to the scores float: ``softmax(scores + mask)`` becomes ``masked_softmax``.

Classic BERT-style attention writes its padding mask as ``scores + (1 - mask) * -10000`` before the softmax. A
quantized add there shares one 8-bit range between the scores and the mask's -10000: calibrated on padded
batches the scores lose every step of resolution, calibrated on unpadded ones the mask is clipped to nothing
and padding gets attention at deployment. ``fxquant.ops.attention.masked_softmax`` (kind ``masked_softmax``,
float in every backend, as SDPA's decomposition uses it) computes the same ``softmax(scores + mask, -1)``.

The mask side is recognized by where it comes from: computed from model inputs (and constants) by ops that hold
no weight and multiply no activations, while the scores come from a matmul or a weighted layer and from other
inputs (a residual of the scores' own input is no mask). A position bias computed from parameters (Swin, T5) is
not an input and stays as it is.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.ops.attention import masked_softmax
from fxquant.ops.kinds import WEIGHTED_KINDS, node_kind
from fxquant.passes.manager import PassResult

_COMPUTED = WEIGHTED_KINDS | {"matmul"}  # kinds that make activations, not masks


def fold_additive_masks(gm: fx.GraphModule) -> PassResult:
    """Rewrite each last-axis softmax of ``scores + mask`` (mask from the inputs) as ``masked_softmax``."""
    modules = dict(gm.named_modules())
    done = 0
    for node in list(gm.graph.nodes):
        if node_kind(node, modules) != "softmax" or not _last_axis(node, modules):
            continue
        add = node.args[0]
        if not isinstance(add, fx.Node) or node_kind(add, modules) != "add" or len(add.users) != 1 \
                or len(add.args) != 2 or add.kwargs or not all(isinstance(a, fx.Node) for a in add.args):
            continue
        (kind_a, inputs_a), (kind_b, inputs_b) = (_origin(a, modules) for a in add.args)
        if sorted((kind_a, kind_b)) != ["computed", "inputs"] or inputs_a & inputs_b:
            continue  # a mask is an input of its own, not a residual of the scores' input
        scores, mask = add.args if kind_a == "computed" else add.args[::-1]
        with gm.graph.inserting_before(node):
            folded = gm.graph.call_function(masked_softmax, (scores, mask, False))
        folded.meta = dict(node.meta)
        node.replace_all_uses_with(folded)
        gm.graph.erase_node(node)
        gm.graph.erase_node(add)
        done += 1
    if done:
        gm.recompile()
    return PassResult(gm, modified=bool(done))


def has_softmax(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls a softmax (the pass has something to look at)."""
    modules = dict(gm.named_modules())
    return any(node_kind(n, modules) == "softmax" for n in gm.graph.nodes)


def _last_axis(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """The softmax normalizes the last axis (and keeps the input's dtype)."""
    if node.op == "call_module":
        dim = modules[node.target].dim
    else:
        if "dtype" in node.kwargs or len(node.args) > 2:
            return False
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    meta = node.meta.get("tensor_meta")
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return isinstance(dim, int) and (dim == -1 or (rank is not None and dim == rank - 1))


def _origin(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, set[fx.Node]]:
    """("computed" when ``node`` depends on a weighted layer or a matmul, else "inputs" when it depends on a model
    input, else "constants"; the model inputs it depends on)."""
    seen, stack, computed, inputs = set(), [node], False, set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _reads_size(n):
            continue  # x.shape, x.size(), sym_size: a size, not the tensor's values
        kind = node_kind(n, modules)
        computed = computed or kind in _COMPUTED or (n.op == "call_module" and kind == "other")
        if kind == "placeholder":
            inputs.add(n)
        stack.extend(n.all_input_nodes)
    return ("computed" if computed else "inputs" if inputs else "constants"), inputs


def _reads_size(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, getattr)
            and (node.target is not getattr or node.args[1] == "shape")) or \
        (node.op == "call_method" and node.target in ("size", "dim"))
