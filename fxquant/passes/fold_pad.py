"""Fold an explicit zero pad (``F.pad`` / ``nn.ZeroPad2d`` / constant-0 ``nn.ConstantPad2d``) into the convolution
it feeds, when the convolution's own ``padding`` can express it (the same amount on both sides of each spatial
dimension). TF-ported models pad "same" this way; unfolded, the pad runs in float between quantized ops.

Contract: the output is unchanged exactly; every pad -> conv pair left alone is noted with the reason.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from fxquant.ops import WeightedOp, weighted_ops
from fxquant.passes.manager import PassResult

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
    if op.kind != "conv":
        return f"`{op.name}` is a {op.kind}, not a convolution"
    if len(pad) > 2 * spatial:
        return f"the pad {list(pad)} also pads non-spatial dimensions"
    pairs = [pad[i:i + 2] for i in range(0, len(pad), 2)]
    if any(a != b or a < 0 for a, b in pairs):
        return (f"the pad {list(pad)} is asymmetric (or negative); a convolution pads both sides equally, so it "
                "stays a separate float Pad")
    if isinstance(op.padding, str) and op.padding != "valid":
        return f"`{op.name}` pads {op.padding!r} already"
    if op.node.op == "call_module":
        module = op.gm.get_submodule(op.node.target)
        if type(module) not in _CONVS:
            return f"`{op.name}` is a {type(module).__name__}, whose forward may not use its `padding` attribute"
        if module.padding_mode != "zeros":
            return f"`{op.name}` pads with padding_mode {module.padding_mode!r}"
    return None


def _padding(op: WeightedOp, pad: tuple[int, ...], spatial: int) -> tuple[int, ...]:
    old = op.padding
    old = (0,) * spatial if old == "valid" else tuple(old) if isinstance(old, (tuple, list)) else (old,) * spatial
    extra = [0] * spatial
    for i in range(0, len(pad), 2):  # F.pad order: last dimension first
        extra[spatial - 1 - i // 2] = pad[i]
    return tuple(o + e for o, e in zip(old, extra, strict=True))


def fold_pad(gm: fx.GraphModule) -> PassResult:
    """Fold every symmetric zero pad that feeds only a convolution into the convolution's padding."""
    ops, _ = weighted_ops(gm)
    notes: list[str] = []
    modified = False
    for conv, op in ops.items():
        src = conv.args[0] if conv.args else None
        if not isinstance(src, fx.Node):
            continue
        pad = _zero_pad(src, gm)
        if pad is None:
            continue
        if len(src.users) != 1:
            notes.append(f"pad `{src.name}` not folded into `{op.name}`: the padded tensor has other users")
            continue
        spatial = op.weight.dim() - 2
        reason = _why_not(op, pad, spatial)
        if reason is not None:
            notes.append(f"pad `{src.name}` not folded into `{op.name}`: {reason}")
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
