"""Decompose ``F.scaled_dot_product_attention`` into matmul -> mask -> softmax -> matmul that rules can place.

Current Hugging Face models call SDPA (one opaque op: both attention matmuls would stay float). In eval mode
(dropout 0) it computes ``softmax(Q K^T * scale + mask) V`` with ``scale = 1/sqrt(d)`` unless given; this pass
writes that into the graph. The scale is folded into the query projection when Q comes from a Linear used only
there through reshapes/transposes (as in BERT/ViT/DistilBERT: no float scalar multiply remains); otherwise the
scores are multiplied by it. Masked scores (bool, float, causal) go through ``fxquant.ops.attention.masked_softmax``
(kind ``masked_softmax``, kept float), unmasked ones through ``torch.softmax``. Calls with dropout or
grouped-query attention stay whole, with a note.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.capture.trace import propagate_shapes
from fxquant.ops.attention import masked_softmax
from fxquant.ops.kinds import node_kind
from fxquant.passes.manager import PassResult

TARGET = F.scaled_dot_product_attention
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_THROUGH = frozenset({"reshape", "permute", "identity"})


def decompose_sdpa(gm: fx.GraphModule, example_inputs: tuple) -> PassResult:
    """Rewrite every eligible SDPA call of ``gm`` (then re-run shape propagation); notes say what stayed whole."""
    notes: list[str] = []
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = dict(zip(_ARGS, node.args, strict=False)) | dict(node.kwargs)
        if bound.get("dropout_p", 0.0) or bound.get("enable_gqa", False):
            notes.append(f"decompose_sdpa: `{node.name}` stays one float op: it uses dropout or grouped-query "
                         "attention (enable_gqa)")
            continue
        _rewrite(gm, node, bound)
        rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    return PassResult(gm, modified=bool(rewritten), notes=notes)


def _head_dim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None) or getattr(node.meta.get("val"), "shape", None)
    return int(shape[-1]) if shape is not None else None


def _query_linear(gm: fx.GraphModule, q: fx.Node) -> nn.Linear | None:
    """The Linear that produces ``q`` through reshapes/transposes, each used once, when only this call uses it."""
    modules = dict(gm.named_modules())
    node = q
    while len(node.users) == 1:
        kind = node_kind(node, modules)
        if kind == "linear" and node.op == "call_module":
            module = modules[node.target]
            calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]
            return module if len(calls) == 1 and isinstance(module, nn.Linear) else None
        if kind not in _THROUGH or not node.all_input_nodes:
            return None
        node = node.args[0] if isinstance(node.args[0], fx.Node) else None
        if node is None:
            return None
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, bound: dict) -> None:
    q, k, v = bound["query"], bound["key"], bound["value"]
    scale = bound.get("scale")
    if scale is None:
        d = _head_dim(q)
        scale = 1.0 / math.sqrt(d) if d else None
    g = gm.graph
    linear = _query_linear(gm, q) if scale is not None else None
    if linear is not None:
        with torch.no_grad():
            linear.weight.mul_(scale)
            if linear.bias is not None:
                linear.bias.mul_(scale)
    with g.inserting_before(node):
        if scale is None:  # shape unknown: the scale is computed at run time, as SDPA does
            scale = g.call_function(operator.truediv, (1.0, g.call_function(math.sqrt, (
                g.call_method("size", (q, -1)),))))
        query = q if linear is not None else g.call_function(operator.mul, (q, scale))
        scores = g.call_function(torch.matmul, (query, g.call_function(torch.transpose, (k, -2, -1))))
        mask, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
        if mask is not None or causal:
            attn = g.call_function(masked_softmax, (scores, mask, causal))
        else:
            attn = g.call_function(torch.softmax, (scores, -1))
        out = g.call_function(torch.matmul, (attn, v))
    node.replace_all_uses_with(out)
    g.erase_node(node)
