"""Inline torchvision's ``shifted_window_attention`` (Swin) so its Linear layers and matmuls get quantized.

torchvision wraps the function with ``torch.fx.wrap`` because its padding, shifts and attention mask depend on
the input's height and width. After shape propagation those are known, so this pass writes the function's
eval-mode computation into the graph with them as constants: pad, roll, window partition (reshape/permute),
the qkv projection as a Linear module (the 1/sqrt(d) query scale folded into its query rows), Q @ K^T,
relative position bias, the shift mask (a constant buffer), softmax, @ V, the output projection, window
reverse, roll back, crop. Swin V2 (cosine attention, ``logit_scale``) calls are left whole with a note.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models import swin_transformer

from fxquant.capture.trace import propagate_shapes
from fxquant.passes.manager import PassResult

_PARAMS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
           "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")

TARGET = swin_transformer.shifted_window_attention
"""The op this pass rewrites: the pipeline runs it only when the graph calls it."""


def inline_window_attention(gm: fx.GraphModule, example_inputs: tuple) -> PassResult:
    """Inline every Swin V1 shifted-window attention call whose input shape is known."""
    notes, done = [], 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not swin_transformer.shifted_window_attention:
            continue
        args = dict(zip(_PARAMS, node.args, strict=False)) | dict(node.kwargs)
        meta = args["input"].meta.get("tensor_meta")
        weights = [args.get(k) for k in ("qkv_weight", "proj_weight")]
        if args.get("logit_scale") is not None:
            notes.append(f"inline_window_attention: `{node.name}` (Swin V2 cosine attention) stays one float op")
        elif meta is None or not all(getattr(w, "op", None) == "get_attr" for w in weights):
            notes.append(f"inline_window_attention: `{node.name}` has no known input shape or constant weights; "
                         "it stays one float op")
        else:
            _inline(gm, node, args, tuple(meta.shape))
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
        propagate_shapes(gm, example_inputs)
    return PassResult(gm, modified=bool(done), notes=notes)


def _linear_module(gm: fx.GraphModule, weight: fx.Node, bias: fx.Node | None, q_scale: float | None) -> str:
    """Replace the holder of ``weight`` (and ``bias``) by an nn.Linear with the same parameters; its path."""
    path = weight.target.rpartition(".")[0]
    w = gm.get_parameter(weight.target) if weight.target in dict(gm.named_parameters()) else \
        gm.get_submodule(path).weight
    b = None if bias is None else getattr(gm.get_submodule(bias.target.rpartition(".")[0]),
                                          bias.target.rpartition(".")[2])
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
        if q_scale is not None:  # the query rows: the first third of the qkv projection
            c = w.shape[0] // 3
            layer.weight[:c] *= q_scale
            if b is not None:
                layer.bias[:c] *= q_scale
    gm.set_submodule(path, layer)
    return path


def _shift_mask(ph: int, pw: int, ws: list[int], shift: list[int], n_windows: int) -> torch.Tensor:
    """The attention mask torchvision builds for shifted windows, shaped (1, nW, 1, L, L)."""
    mask = torch.zeros(ph, pw)
    h_slices = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(n_windows, ws[0] * ws[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return mask.unsqueeze(1).unsqueeze(0)


def _inline(gm: fx.GraphModule, node: fx.Node, args: dict, shape: tuple[int, ...]) -> None:
    _, h, w, c = shape
    ws, heads = list(args["window_size"]), args["num_heads"]
    shift = list(args.get("shift_size", [0, 0]))
    pad_r, pad_b = (ws[1] - w % ws[1]) % ws[1], (ws[0] - h % ws[0]) % ws[0]
    ph, pw = h + pad_b, w + pad_r
    if ws[0] >= ph:
        shift[0] = 0
    if ws[1] >= pw:
        shift[1] = 0
    n_windows, length = (ph // ws[0]) * (pw // ws[1]), ws[0] * ws[1]
    qkv = _linear_module(gm, args["qkv_weight"], args.get("qkv_bias"), (c // heads) ** -0.5)
    proj = _linear_module(gm, args["proj_weight"], args.get("proj_bias"), None)
    g = gm.graph
    with g.inserting_before(node):
        x = args["input"]
        if pad_r or pad_b:
            x = g.call_function(F.pad, (x, (0, 0, 0, pad_r, 0, pad_b)))
        if sum(shift) > 0:
            x = g.call_function(torch.roll, (x,), {"shifts": (-shift[0], -shift[1]), "dims": (1, 2)})
        x = g.call_method("reshape", (x, -1, ph // ws[0], ws[0], pw // ws[1], ws[1], c))
        x = g.call_method("reshape", (g.call_method("permute", (x, 0, 1, 3, 2, 4, 5)), -1, length, c))
        t = g.call_module(qkv, (x,))
        t = g.call_method("permute", (g.call_method("reshape", (t, -1, length, 3, heads, c // heads)), 2, 0, 3, 1, 4))
        q, k, v = (g.call_function(operator.getitem, (t, i)) for i in range(3))
        attn = g.call_function(torch.matmul, (q, g.call_method("transpose", (k, -2, -1))))
        attn = g.call_function(operator.add, (attn, args["relative_position_bias"]))
        if sum(shift) > 0:
            name = f"{qkv.rpartition('.')[0]}.shift_mask".lstrip(".")
            device = gm.get_submodule(qkv).weight.device  # the model's device (a CUDA model keeps its mask there)
            gm.register_buffer(name.replace(".", "_"), _shift_mask(ph, pw, ws, shift, n_windows).to(device))
            mask = g.get_attr(name.replace(".", "_"))
            attn = g.call_method("reshape", (attn, -1, n_windows, heads, length, length))
            attn = g.call_method("reshape", (g.call_function(operator.add, (attn, mask)), -1, heads, length, length))
        attn = g.call_function(torch.softmax, (attn, -1))
        x = g.call_function(torch.matmul, (attn, v))
        x = g.call_method("reshape", (g.call_method("transpose", (x, 1, 2)), -1, length, c))
        x = g.call_module(proj, (x,))
        x = g.call_method("reshape", (x, -1, ph // ws[0], pw // ws[1], ws[0], ws[1], c))
        x = g.call_method("reshape", (g.call_method("permute", (x, 0, 1, 3, 2, 4, 5)), -1, ph, pw, c))
        if sum(shift) > 0:
            x = g.call_function(torch.roll, (x,), {"shifts": (shift[0], shift[1]), "dims": (1, 2)})
        if pad_r or pad_b:
            x = g.call_method("contiguous", (g.call_function(operator.getitem, (x, (slice(None), slice(None, h),
                                                                                 slice(None, w), slice(None)))),))
    node.replace_all_uses_with(x)
    g.erase_node(node)
    for weight in (args["qkv_weight"], args["proj_weight"], args.get("qkv_bias"), args.get("proj_bias")):
        if weight is not None and not weight.users:
            g.erase_node(weight)
