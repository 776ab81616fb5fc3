"""Fold an explicit zero pad (``F.pad`` / ``nn.ZeroPad2d`` / constant-0 ``nn.ConstantPad2d``) into the convolution
it feeds, when the convolution's own ``padding`` can express it (the same amount on both sides of each spatial
dimension). TF-ported models pad "same" this way; unfolded, the pad runs in float between quantized ops.

An asymmetric zero pad (TF "same" at stride 2: ``[0, 1, 0, 1]``) or one read by several convolutions stays in
the torch graph, marked ``pad_merged_into`` (``fxquant.provenance``): export_onnx merges it into the ONNX Convs'
``pads``, which take begin and end amounts apart (``fxquant.lower.onnx_passes.merge_pads``), so no Pad runs there.

Contract: the output is unchanged exactly; every pad -> conv pair left alone is noted with the reason.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from fxquant.ops.kinds import WeightedOp, weighted_ops
from fxquant.passes.manager import PassResult
from fxquant.provenance import info

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


def _zero_pad(node: fx.Node, gm: fx.GraphModule) -> tuple[int, ...] | None:
    """The pad amounts of a constant-zero pad node (F.pad order: last dimension first), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) not in _PAD_MODULES or module.value != 0:
            return None
        return tuple(module.padding)
    if node.op != "call_function" or node.target is not F.pad or len(node.args) < 2:
        return None
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    pad = node.args[1]
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)) or \
            not all(isinstance(p, int) for p in pad):
        return None
    return tuple(pad)


def has_pads(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls ``F.pad`` or a zero/constant pad module (the pass has something to look at)."""
    return any((n.op == "call_function" and n.target is F.pad) or
               (n.op == "call_module" and type(gm.get_submodule(n.target)) in _PAD_MODULES) for n in gm.graph.nodes)


def _why_not(op: WeightedOp, pad: tuple[int, ...], spatial: int) -> str | None:
    """Why neither the convolution's ``padding`` nor the exported ONNX Conv's ``pads`` can take ``pad``."""
    if op.kind != "conv":
        return f"`{op.name}` is a {op.kind}, not a convolution"
    if len(pad) > 2 * spatial:
        return f"the pad {list(pad)} also pads non-spatial dimensions"
    if any(p < 0 for p in pad):
        return f"the pad {list(pad)} crops (negative amounts)"
    if isinstance(op.padding, str) and op.padding != "valid":
        return f"`{op.name}` pads {op.padding!r} already"
    if op.node.op == "call_module":
        module = op.gm.get_submodule(op.node.target)
        if type(module) not in _CONVS:
            return f"`{op.name}` is a {type(module).__name__}, whose forward may not use its `padding` attribute"
        if module.padding_mode != "zeros":
            return f"`{op.name}` pads with padding_mode {module.padding_mode!r}"
    return None


def _symmetric(pad: tuple[int, ...]) -> bool:
    return all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2))


def _padding(op: WeightedOp, pad: tuple[int, ...], spatial: int) -> tuple[int, ...]:
    old = op.padding
    old = (0,) * spatial if old == "valid" else tuple(old) if isinstance(old, (tuple, list)) else (old,) * spatial
    extra = [0] * spatial
    for i in range(0, len(pad), 2):  # F.pad order: last dimension first
        extra[spatial - 1 - i // 2] = pad[i]
    return tuple(o + e for o, e in zip(old, extra, strict=True))


def fold_pad(gm: fx.GraphModule) -> PassResult:
    """Fold every symmetric zero pad that feeds only a convolution into the convolution's padding; mark the
    zero pads only ONNX can merge (asymmetric, or read by several convolutions) for export_onnx."""
    ops, _ = weighted_ops(gm)
    notes: list[str] = []
    modified = False
    seen: set[fx.Node] = set()  # pads read by several convolutions: one note
    for conv, op in ops.items():
        src = conv.args[0] if conv.args else None
        if not isinstance(src, fx.Node) or src in seen:
            continue
        pad = _zero_pad(src, gm)
        if pad is None:
            continue
        spatial = op.weight.dim() - 2
        reason = _why_not(op, pad, spatial)
        if reason is not None:
            notes.append(f"pad `{src.name}` not folded into `{op.name}`: {reason}; it stays a float Pad")
            continue
        if len(src.users) != 1 or not _symmetric(pad):
            notes.append(_export_merge(src, pad, conv, ops))
            seen.add(src)
            continue
        padding = _padding(op, pad, spatial)
        if conv.op == "call_module":
            module = op.owned()
            module.padding = padding
        else:
            op.set_padding(padding)
        conv.replace_input_with(src, src.args[0])
        gm.graph.erase_node(src)
        if src.op == "call_module" and not any(n.target == src.target for n in gm.graph.nodes):
            gm.delete_submodule(src.target)  # a pad module called nowhere else
        modified = True
    return PassResult(gm, modified, notes)


def _export_merge(src: fx.Node, pad: tuple[int, ...], conv: fx.Node, ops: dict[fx.Node, WeightedOp]) -> str:
    """Mark ``src`` for export_onnx's Pad merge when every reader is a convolution that can take it; the note."""
    why = ("the padded tensor has other users" if _symmetric(pad) else
           f"the pad {list(pad)} is asymmetric (a torch convolution pads both sides equally)")
    others = [u for u in src.users if u is not conv]
    blocked = next((f"`{u.name}` reads it too and is not a convolution that can take it" for u in others
                    if u not in ops or u.args[0] is not src or
                    _why_not(ops[u], pad, ops[u].weight.dim() - 2) is not None), None)
    if blocked is not None:
        return f"pad `{src.name}` not folded into `{ops[conv].name}`: {why}; {blocked}, so it stays a float Pad"
    readers = ", ".join(f"`{ops[u].name}`" for u in src.users)
    info(src).pad_merged_into = readers
    return (f"pad `{src.name}` not folded into {readers} in the torch graph: {why}; export_onnx merges it into "
            "the ONNX Conv pads (begin and end apart), so no Pad runs")
