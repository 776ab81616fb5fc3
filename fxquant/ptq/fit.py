"""One block's reconstruction: Adam on the rounding variables of its weights against the float block's output.

Each step takes ``batch_size`` random samples and, where the block's inputs are feature maps larger than
``crop``, a random ``crop`` x ``crop`` window of them (the float block recomputes its target on the same window:
a convolutional block is the same function on any window, so this is the reconstruction objective on smaller
inputs, at a fraction of the cost). The block's input is QDrop's random element-wise mix of the float and the
quantized model's values, and each of its activation quantizers keeps its float input per element with
probability ``act_drop``. The loss is the squared error summed over channels, averaged over samples and
positions (as QDrop and AIMET compute it), plus AdaRound's regularizer after the warm-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.ptq.blocks import BATCH, Block
from fxquant.ptq.layers import Layer, disabled
from fxquant.ptq.rounding import SoftRounding
from fxquant.quantizer import TensorQuantizer
from fxquant.spec import AdaRoundOptions


def take(values: Sequence[object], index: slice | torch.Tensor) -> list[object]:
    """A block's arguments for the samples ``index`` selects: tensor rows, the sample count for ``BATCH``, a
    constant's value."""
    rows = next(v for v in values if isinstance(v, torch.Tensor))[index].shape[0]
    return [v[index] if isinstance(v, torch.Tensor) else rows if v == BATCH else v[1] for v in values]


@torch.enable_grad()  # calibrate() runs under no_grad
def fit(module: fx.GraphModule, block: Block, pairs: list[tuple[Layer, SoftRounding]],
        data: tuple[list, list, list], options: AdaRoundOptions, generator: torch.Generator, bar: tqdm) -> None:
    """Fit the rounding variables of ``pairs`` (the block's layers) for ``options.iterations`` steps; ``data``:
    the block's float inputs, quantized inputs and float outputs over all samples."""
    fp_in, q_in, targets = data
    opt = torch.optim.Adam([soft.V for _, soft in pairs], lr=options.lr)
    warm = int(options.warm_up * options.iterations)
    n = targets[0].shape[0]
    size = min(options.batch_size, n)
    window = _window(q_in, options.crop)
    activations = _quantizers(module, block)
    quantizers = activations + [layer.quantizer for layer, _ in pairs]
    switch = _Switch()
    with _hooks(pairs, activations, options.act_drop, generator, switch):
        for it in range(options.iterations):
            idx = torch.randint(0, n, (size,), generator=generator)
            fp, q = take(fp_in, idx), take(q_in, idx)
            if window is None:
                target = [t[idx] for t in targets]
            else:
                corner = _corner(q, window, generator)
                fp, q = _crop(fp, window, corner), _crop(q, window, corner)
                with torch.no_grad(), disabled(quantizers):
                    target = list(module(*fp))
            switch.on = True
            loss = _loss(module(*[_mix(f, v, options.act_drop, generator) for f, v in zip(fp, q, strict=True)]),
                         target)
            switch.on = False
            if it >= warm:
                share = (it - warm) / max(options.iterations - warm, 1)
                beta = options.beta_start + (options.beta_end - options.beta_start) * share
                loss = loss + options.reg_weight * sum(soft.regularizer(beta) for _, soft in pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)


def _loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((o - t).pow(2).sum(1 if o.dim() > 1 else 0).mean() for o, t in zip(outputs, targets, strict=True))


def _mix(fp: object, q: object, drop: float, generator: torch.Generator) -> object:
    """QDrop's input: each element float with probability ``drop``, else quantized (non-tensors as they are)."""
    if drop <= 0 or not isinstance(q, torch.Tensor) or not q.is_floating_point():
        return q
    if drop >= 1:
        return fp
    return torch.where(torch.rand(q.shape, generator=generator).to(q.device) < drop, fp, q)


def _window(inputs: Sequence[object], crop: int | None) -> tuple[int, int] | None:
    """(height, width) of the input windows to train on, or None: the block's tensor inputs must be feature maps
    (at least 3 dimensions) of one spatial size, larger than ``crop`` somewhere."""
    maps = [v for v in inputs if isinstance(v, torch.Tensor)]
    if crop is None or any(v.dim() < 3 for v in maps) or len({tuple(v.shape[2:]) for v in maps}) != 1:
        return None
    size = maps[0].shape[2:]
    if len(size) != 2 or max(size) <= crop:
        return None
    return min(crop, size[0]), min(crop, size[1])


def _crop(values: list[object], window: tuple[int, int], corner: tuple[int, int]) -> list[object]:
    """The window at ``corner`` of every feature map in ``values``."""
    t, w = corner
    return [v[:, :, t:t + window[0], w:w + window[1]] if isinstance(v, torch.Tensor) else v for v in values]


def _corner(values: list[object], window: tuple[int, int], generator: torch.Generator) -> tuple[int, int]:
    some = next(v for v in values if isinstance(v, torch.Tensor))
    return (int(torch.randint(0, some.shape[2] - window[0] + 1, (1,), generator=generator)),
            int(torch.randint(0, some.shape[3] - window[1] + 1, (1,), generator=generator)))


def _quantizers(module: fx.GraphModule, block: Block) -> list[TensorQuantizer]:
    """The block's activation quantizers that quantize (graph nodes, not weights)."""
    found = []
    for n in block.nodes:
        if n.op == "call_module":
            m = module.get_submodule(n.target)
            if isinstance(m, TensorQuantizer) and not m.constant and m.mode == "quant":
                found.append(m)
    return found


class _Switch:
    on = False


@contextlib.contextmanager
def _hooks(pairs: list[tuple[Layer, SoftRounding]], activations: list[TensorQuantizer], drop: float,
           generator: torch.Generator, switch: _Switch) -> Iterator[None]:
    """While ``switch.on``: each layer's weight quantizer returns its soft-rounded weight, and each activation
    quantizer keeps its float input per element with probability ``drop``."""
    def soft_hook(soft: SoftRounding):
        return lambda _m, _args, out: soft.weight() if switch.on else out

    def drop_hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return _mix(args[0], out, drop, generator) if switch.on else out

    handles = [layer.quantizer.register_forward_hook(soft_hook(soft)) for layer, soft in pairs]
    handles += [q.register_forward_hook(drop_hook) for q in activations] if drop > 0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()
