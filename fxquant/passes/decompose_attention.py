"""Decompose nn.MultiheadAttention calls into Linear, MatMul and Softmax nodes that rules can quantize.

torch.fx keeps ``nn.MultiheadAttention`` as one opaque leaf (its forward branches on tensor properties), so
its projections and the two attention matmuls would stay float. In eval mode the module computes, per head,
``softmax((x Wq + bq) / sqrt(d) @ (x Wk + bk)^T) @ (x Wv + bv)``, then ``out_proj``; this pass writes exactly
that into the graph: three Linear modules (the 1/sqrt(d) scale folded into the query projection, so no
float scalar multiply remains), ``matmul`` for Q @ K^T and for softmax @ V, and a Linear ``out_proj``.
torch.ao's quantizable MultiheadAttention makes the same split. Calls it cannot rewrite exactly (masks,
``need_weights`` results that are used, bias_k/bias_v, add_zero_attn, different key/value dims) are left as
they are, and the pass says why.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from fxquant.capture.trace import propagate_shapes
from fxquant.passes.manager import PassResult
from fxquant.provenance import info

TARGET = nn.MultiheadAttention
"""The op this pass rewrites: the pipeline runs it only when the graph calls it."""


def _why_not(mha: nn.MultiheadAttention, node: fx.Node) -> str | None:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "separate key/value dims, bias_k/bias_v or add_zero_attn"
    bound = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"),
                     node.args, strict=False)) | dict(node.kwargs)
    for mask in ("key_padding_mask", "attn_mask"):
        if bound.get(mask) is not None:
            return f"it is called with {mask}"
    if bound.get("is_causal"):
        return "it is called with is_causal=True"
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return "its output tuple is used as a whole"
        if user.args[1] != 0 and user.users:
            return "its attention weights (need_weights) are used"
    return None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight * scale)
        if bias is not None:
            layer.bias.copy_(bias * scale)
    return layer


def decompose_attention(gm: fx.GraphModule, example_inputs: tuple) -> PassResult:
    """Rewrite every eligible nn.MultiheadAttention call in ``gm`` (then re-run shape propagation on
    ``example_inputs``); the notes name the calls left whole and why."""
    notes: list[str] = []
    modules = dict(gm.named_modules())
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.MultiheadAttention):
            continue
        mha = modules[node.target]
        why = _why_not(mha, node)
        if why is not None:
            notes.append(f"decompose_attention: `{node.target}` stays one float op: {why}")
            continue
        _rewrite(gm, node, mha)
        rewritten += 1
    if rewritten:
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    return PassResult(gm, modified=bool(rewritten), notes=notes)


def _rewrite(gm: fx.GraphModule, node: fx.Node, mha: nn.MultiheadAttention) -> None:
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    chunks = [(w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e]) for i in range(3)]
    target = node.target
    gm.delete_submodule(target)
    names = {}
    for label, (wi, bi), scale in zip(("q_proj", "k_proj", "v_proj"), chunks, (1 / math.sqrt(d), 1.0, 1.0),
                                       strict=True):
        names[label] = f"{target}.{label}"
        gm.add_submodule(names[label], _linear(wi, bi, scale))
    names["out_proj"] = f"{target}.out_proj"
    gm.add_submodule(names["out_proj"], _linear(mha.out_proj.weight, mha.out_proj.bias))
    bound = dict(zip(("query", "key", "value"), node.args, strict=False)) | dict(node.kwargs)
    g = gm.graph
    with g.inserting_before(node):
        ins = [bound["query"], bound["key"], bound["value"]]
        if not mha.batch_first:  # (L, B, E) -> (B, L, E), once per distinct input
            batch_first = {x: g.call_method("transpose", (x, 0, 1)) for x in dict.fromkeys(ins)}
            ins = [batch_first[x] for x in ins]
        heads = []
        for label, x in zip(("q_proj", "k_proj", "v_proj"), ins, strict=True):
            y = g.call_module(names[label], (x,))
            heads.append(g.call_method("transpose", (g.call_method("unflatten", (y, -1, (h, d))), 1, 2)))
        q, k, v = heads  # (B, H, L, D)
        scores = g.call_function(torch.matmul, (q, g.call_method("transpose", (k, -2, -1))))
        attn = g.call_function(torch.softmax, (scores, -1))
        ctx = g.call_function(torch.matmul, (attn, v))
        merged = g.call_method("flatten", (g.call_method("transpose", (ctx, 1, 2)), 2))
        out = g.call_module(names["out_proj"], (merged,))
        if not mha.batch_first:
            out = g.call_method("transpose", (out, 0, 1))
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    for n in (out, *out.all_input_nodes):
        record = info(n)
        record.made_by, record.decomposed_from = "decompose_attention", target
