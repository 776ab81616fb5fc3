"""One block's reconstruction: Adam on the rounding variables of its weights against the float block's output.

Each step takes ``batch_size`` random samples and, where the block's inputs are feature maps larger than
``crop``, a random ``crop`` x ``crop`` window of them (the float block recomputes its target on the same window:
a convolutional block is the same function on any window, so this is the reconstruction objective on smaller
inputs, at a fraction of the cost). The block's input is QDrop's random element-wise mix of the float and the
quantized model's values, and each of its activation quantizers keeps its float input per element with
probability ``act_drop``. The loss is the squared error summed over channels, averaged over samples and
positions (as QDrop and AIMET compute it), plus AdaRound's regularizer after the warm-up.

While a block is fitted, its quantizers are swapped for training forms (``_training``): each activation quantizer
runs as one fused fake-quant op (its step optionally learned, ``AdaRoundOptions.act_lr``) and each layer's weight
quantizer returns the soft-rounded weight; the originals are put back afterwards.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant import qmath
from fxquant.ptq.blocks import BATCH, Block, block_module
from fxquant.ptq.layers import Layer
from fxquant.ptq.rounding import SoftRounding
from fxquant.quantizer import TensorQuantizer
from fxquant.spec import AdaRoundOptions


def take(values: Sequence[object], index: slice | torch.Tensor) -> list[object]:
    """A block's arguments for the samples ``index`` selects: tensor rows, the sample count for ``BATCH``, a
    constant's value."""
    rows = next(v for v in values if isinstance(v, torch.Tensor))[index].shape[0]
    return [v[index] if isinstance(v, torch.Tensor) else rows if v == BATCH else v[1] for v in values]


@torch.enable_grad()  # calibrate() runs under no_grad
def fit(gm: fx.GraphModule, block: Block, pairs: list[tuple[Layer, SoftRounding]],
        data: tuple[list, list, list], options: AdaRoundOptions, generator: torch.Generator,
        bar: tqdm) -> dict[str, float]:
    """Fit the rounding variables of ``pairs`` (the block's layers), and the steps of the activation quantizers
    only the block calls, for ``options.iterations`` steps; ``data``: the block's float inputs, quantized inputs
    and float outputs over all samples. Returns the factor each learned activation step was scaled by."""
    fp_in, q_in, targets = data
    warm = int(options.warm_up * options.iterations)
    n = targets[0].shape[0]
    size = min(options.batch_size, n)
    window = _window(q_in, options.crop)
    learned: dict[str, float] = {}
    with _training(gm, block, pairs, options, generator, learned) as (module, mode, steps):
        groups = [{"params": [soft.V for _, soft in pairs], "lr": options.lr}]
        opt = torch.optim.Adam(groups + ([{"params": steps, "lr": options.act_lr}] if steps else []))
        for it in range(options.iterations):
            idx = torch.randint(0, n, (size,), generator=generator)
            fp, q = take(fp_in, idx), take(q_in, idx)
            if window is None:
                target = [t[idx] for t in targets]
            else:
                corner = _corner(q, window, generator)
                fp, q = _crop(fp, window, corner), _crop(q, window, corner)
                mode.train = False
                with torch.no_grad():
                    target = list(module(*fp))
                mode.train = True
            fp, q, target = _channels_last(fp), _channels_last(q), _channels_last(target)
            loss = _loss(module(*[_mix(f, v, options.act_drop, generator) for f, v in zip(fp, q, strict=True)]),
                         target)
            if it >= warm:
                share = (it - warm) / max(options.iterations - warm, 1)
                beta = options.beta_start + (options.beta_end - options.beta_start) * share
                loss = loss + options.reg_weight * sum(soft.regularizer(beta) for _, soft in pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
    return learned


def _loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((o - t).pow(2).sum(1 if o.dim() > 1 else 0).mean() for o, t in zip(outputs, targets, strict=True))


def _mix(fp: object, q: object, drop: float, generator: torch.Generator) -> object:
    """QDrop's input: each element float with probability ``drop``, else quantized (non-tensors as they are)."""
    if drop <= 0 or not isinstance(q, torch.Tensor) or not q.is_floating_point():
        return q
    if drop >= 1:
        return fp
    return torch.where(keep_mask(q.shape, drop, generator).to(q.device), fp, q)


def keep_mask(shape: torch.Size, p: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean tensor of ``shape``, each element True with probability ``p`` (in steps of 1/256): one random
    byte per element, seven bytes per 64-bit draw (a float draw per element costs several times as much)."""
    count = math.prod(shape)
    words = -(-count // 7)
    draws = torch.empty(words, dtype=torch.int64).random_(0, 1 << 56, generator=generator)
    low = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)  # the seven random bytes of each draw
    return (draws.view(torch.uint8).view(words, 8)[:, low].reshape(-1)[:count] < round(p * 256)).view(shape)


def _channels_last(values: list[object]) -> list[object]:
    """4-D tensors in channels-last memory order (a depthwise convolution's backward runs faster so)."""
    return [v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4 else v
            for v in values]


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


def _quantizers(gm: fx.GraphModule, block: Block) -> dict[str, TensorQuantizer]:
    """The block's activation quantizers that quantize (graph nodes, not weights), by module path."""
    found = {}
    for n in block.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, TensorQuantizer) and not m.constant and m.mode == "quant":
                found[n.target] = m
    return found


class _Mode:
    """What the training view computes: the quantized block with soft weights (``train``) or the float one."""

    train = True


class _ActivationQuantizer(nn.Module):
    """An activation quantizer during fitting: one fused fake-quant op where the range is one static step and
    zero point (else the quantizer itself), its input kept per element with probability ``drop`` (QDrop);
    the identity in float mode. With ``learn``, the step is ``step * exp(log_factor)`` with ``log_factor``
    learned (LSQ's gradient for the step, Esser et al. 2020; the zero point stays)."""

    def __init__(self, quantizer: TensorQuantizer, drop: float, generator: torch.Generator, mode: _Mode,
                 learn: bool) -> None:
        super().__init__()
        self.quantizer, self.drop, self.generator, self.mode = quantizer, drop, generator, mode
        self.step = self.zero_point = self.log_factor = None
        spec = quantizer.spec
        if quantizer.is_calibrated and spec.fake_quant and not spec.dynamic and quantizer.scale.numel() == 1:
            step, zero_point = quantizer.scale.float(), quantizer.zero_point.float()
            if float(step) > qmath.EPS and spec.qmin <= float(zero_point) <= spec.qmax:
                self.step, self.zero_point = step.reshape(1), zero_point.reshape(1)
                if learn:
                    self.log_factor = nn.Parameter(torch.zeros(1, device=step.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mode.train:
            return x
        spec = self.quantizer.spec
        if self.step is None or x.dtype != torch.float32:
            out = self.quantizer(x)
        elif self.log_factor is None:
            out = torch.fake_quantize_per_tensor_affine(x, self.step.to(x.device),
                                                        self.zero_point.to(x.device, torch.int32), spec.qmin,
                                                        spec.qmax)
        else:
            step = self.step.to(x.device) * self.log_factor.exp()
            out = torch._fake_quantize_learnable_per_tensor_affine(x, step, self.zero_point.to(x.device),
                                                                   spec.qmin, spec.qmax, 1.0)
        return _mix(x, out, self.drop, self.generator)

    @torch.no_grad()
    def apply_learned_step(self) -> float:
        """Scale the quantizer's range by the learned factor (its step with it; the zero point stays); returns
        the factor (1 when nothing was learned)."""
        if self.log_factor is None or not bool(torch.isfinite(self.log_factor).all()):
            return 1.0
        factor = float(self.log_factor.exp())
        q = self.quantizer
        q._store_range(q._min * factor, q._max * factor)
        return factor


class _SoftWeight(nn.Module):
    """A weight quantizer during fitting: the soft-rounded weight, or the float one in float mode."""

    def __init__(self, soft: SoftRounding, mode: _Mode) -> None:
        super().__init__()
        self.soft, self.mode = soft, mode

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.soft.weight().to(w.dtype) if self.mode.train else w


@contextlib.contextmanager
def _training(gm: fx.GraphModule, block: Block, pairs: list[tuple[Layer, SoftRounding]], options: AdaRoundOptions,
              generator: torch.Generator, learned: dict[str, float]) -> Iterator[tuple[fx.GraphModule, _Mode, list]]:
    """The block as a module to fit, its mode switch and its parameters to learn: its activation quantizers and
    its layers' weight quantizers replaced by their training forms (``_ActivationQuantizer``, ``_SoftWeight``)
    for the duration. Activation steps are learned (``options.act_lr``) for the quantizers called only inside
    the block; their factors go to ``learned`` (module path -> factor) and into their ranges at the end."""
    mode = _Mode()
    activations = _quantizers(gm, block)
    inside = set(block.nodes)
    calls = {path: [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path] for path in activations}
    weights = [(layer, layer.quantizer) for layer, _ in pairs]
    wrappers = {path: _ActivationQuantizer(q, options.act_drop, generator, mode,
                                           options.act_lr > 0 and all(n in inside for n in calls[path]))
                for path, q in activations.items()}
    try:
        for path, wrapper in wrappers.items():
            gm.set_submodule(path, wrapper)
        for layer, soft in pairs:
            layer.quantizer = _SoftWeight(soft, mode)
        steps = [w.log_factor for w in wrappers.values() if w.log_factor is not None]
        yield block_module(gm, block), mode, steps
        for path, wrapper in wrappers.items():
            if wrapper.log_factor is not None:
                learned[path] = wrapper.apply_learned_step()
    finally:
        for path, q in activations.items():
            gm.set_submodule(path, q)
        for layer, q in weights:
            layer.quantizer = q
