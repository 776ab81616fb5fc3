"""Ranges from the positions that count: padded tokens do not set activation ranges.

Users calibrate transformers on padded batches. A padded position's activations are ones the attention mask
hides from every real token and the pooling ignores, yet they reach every per-tensor range: on
all-MiniLM-L6-v2 calibrated on batches padded to 64 they widen the static ranges until the onnxruntime preset
falls to cosine 0.958 (from 0.998). At deployment, padded or not, the real positions never read them (row-wise
ops keep them in their rows; attention gives masked keys weight 0), so a range that clips them costs nothing.

The mask is an input of the model: a forward argument named as in ``MASK_INPUTS`` (``attention_mask``: 1 keeps
a position; torch's ``key_padding_mask``: True pads one), two-dimensional (batch, sequence), holding only 0 and
1. Which axes of each quantizer's input carry the batch and the sequence is measured, not guessed: the model
runs twice on the first padded batch cut to two (batch, length) pairs, quantizers off, and an axis whose size
follows the batch (or a multiple of it: heads folded into the batch), the length, or their product is that
axis; attention scores carry the length twice (queries and keys: both must be real). A quantizer whose input
carries no such axes collects from every position, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fxquant.calib.batches import forward_arity
from fxquant.quantizer import TensorQuantizer

MASK_INPUTS: dict[str, bool] = {  # forward argument name -> whether a 1 (True) marks a real position
    "attention_mask": True, "input_mask": True, "padding_mask": False, "key_padding_mask": False,
    "src_key_padding_mask": False,
}
MIN_LENGTH = 6  # shorter sequences are too short to tell the length from the probe batches (2 and 3)
_PROBES = ((2, 0), (3, 1))  # (batch, how much shorter than the calibration batch) of the two probe runs


@dataclass(frozen=True)
class TokenAxes:
    """Where a tensor carries the batch and the sequence: ``batch`` (an axis of ``repeat`` rows per sequence)
    with one or two ``seqs`` axes, or one ``flat`` axis of batch * length tokens (batch-major); ``static``: the
    sizes of its other axes."""

    static: tuple[int | None, ...]
    batch: int | None = None
    repeat: int = 1
    seqs: tuple[int, ...] = ()
    flat: int | None = None

    def fits(self, shape: torch.Size, batch: int, length: int) -> bool:
        """Whether a tensor of ``shape`` has this layout in a batch of (batch, length)."""
        if len(shape) != len(self.static):
            return False
        want = list(self.static)
        if self.flat is not None:
            want[self.flat] = batch * length
        else:
            want[self.batch] = batch * self.repeat
            for axis in self.seqs:
                want[axis] = length
        return tuple(shape) == tuple(want)

    def select(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The values of ``x`` at real positions (flat), for a keep mask of shape (batch, length)."""
        if self.flat is not None:
            mask, where = keep.reshape(-1), (self.flat,)
        else:
            rows = keep.repeat_interleave(self.repeat, 0) if self.repeat > 1 else keep
            mask = rows if len(self.seqs) == 1 else rows[:, :, None] & rows[:, None, :]
            where = (self.batch, *self.seqs)
        order = sorted(range(len(where)), key=lambda i: where[i])
        mask = mask.permute(*order) if mask.dim() > 1 else mask
        shape = [1] * x.dim()
        for i in order:
            shape[where[i]] = x.shape[where[i]]
        return x[mask.reshape(shape).expand_as(x)]


@dataclass
class PositionReport:
    """What ``counting_positions`` did: the mask input, how many quantizers followed it, the share of padded
    positions seen, and why nothing was masked when nothing was."""

    mask: str | None = None
    masked: list[str] = field(default_factory=list)
    padded: float = 0.0
    why_not: str | None = None


class _Positions:
    """The per-batch keep mask (a forward pre-hook on the model) and the per-quantizer axes (probed once)."""

    def __init__(self, model: nn.Module, quantizers: Mapping[str, TensorQuantizer], name: str, index: int,
                 real_is_one: bool) -> None:
        self.model, self.quantizers, self.index, self.real_is_one = model, dict(quantizers), index, real_is_one
        self.report = PositionReport(mask=name)
        self.keep: torch.Tensor | None = None
        self.axes: dict[str, list[TokenAxes]] | None = None
        self.probing = False
        self.seen = self.padded = 0

    def before_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.probing:
            return
        keep = self._keep(args, kwargs)
        if keep is not None and bool((~keep).any()) and self.axes is None:
            self.axes = self._probe(args, kwargs, keep.shape)
        self.keep = keep if self.axes else None
        if self.keep is not None:
            self.seen += keep.numel()
            self.padded += int((~keep).sum())

    def _keep(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        mask = args[self.index] if self.index < len(args) else kwargs.get(self.report.mask)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.numel() == 0:
            return None
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            return None  # not a 0/1 padding mask (an additive float mask, say): every position counts
        keep = mask.bool() if self.real_is_one else ~mask.bool()
        return keep

    def _probe(self, args: tuple, kwargs: dict, size: torch.Size) -> dict[str, list[TokenAxes]]:
        batch, length = size
        if length < MIN_LENGTH:
            self.report.why_not = f"padded positions set ranges: sequences of {length} are too short to probe"
            return {}
        shapes = [self._shapes(args, kwargs, batch, length, b, length - cut) for b, cut in _PROBES]
        if shapes[0] is None or shapes[1] is None:
            self.report.why_not = ("padded positions set ranges: the model does not run at other batch sizes and "
                                   "lengths, so the sequence axes could not be found")
            return {}
        (b1, t1), (b2, t2) = ((b, length - cut) for b, cut in _PROBES)
        axes: dict[str, list[TokenAxes]] = {}
        for name in self.quantizers:  # a quantizer shared by several tensors sees one layout per call
            calls = zip(shapes[0].get(name, []), shapes[1].get(name, []), strict=False)
            found = [a for s1, s2 in calls if (a := _classify(s1, s2, (b1, t1), (b2, t2))) is not None]
            if found:
                axes[name] = list(dict.fromkeys(found))
        self.report.masked = sorted(axes)
        if not axes:
            self.report.why_not = "padded positions set ranges: no quantized tensor follows the batch and sequence"
        return axes

    def _shapes(self, args: tuple, kwargs: dict, batch: int, length: int, b: int, t: int
                ) -> dict[str, list[tuple[int, ...]]] | None:
        """Input shapes of each quantizer's calls with the batch cut to ``b`` rows and the sequence to ``t``."""
        rows = torch.arange(b) % batch

        def cut(x: object) -> object:
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
                return x
            x = x[rows.to(x.device)]
            return x[:, :t] if x.dim() >= 2 and x.shape[1] == length else x

        shapes: dict[str, list[tuple[int, ...]]] = {}

        def record(name: str, args: tuple) -> None:
            shapes.setdefault(name, []).append(tuple(args[0].shape))

        hooks = [q.register_forward_pre_hook(lambda _m, a, n=name: record(n, a)) for name, q in self.quantizers.items()]
        modes = {name: q.mode for name, q in self.quantizers.items()}
        self.probing = True
        try:
            for q in self.quantizers.values():
                q.set_mode("disabled")
            with torch.no_grad():
                self.model(*(cut(x) for x in args), **{k: cut(v) for k, v in kwargs.items()})
        except Exception:  # the model does not run at other sizes (a fixed length, say): no axes to find
            return None
        finally:
            self.probing = False
            for h in hooks:
                h.remove()
            for name, q in self.quantizers.items():
                q.set_mode(modes[name])
        return shapes

    def collect(self, name: str, collect: object, x: torch.Tensor) -> None:
        keep = self.keep
        layout = None if keep is None or keep.all() else next(
            (a for a in (self.axes or {}).get(name, []) if a.fits(x.shape, *keep.shape)), None)
        if layout is None:  # no padding here, or a layout the probe did not see: every position counts
            collect(x)
            return
        values = layout.select(x, keep.to(x.device))
        if values.numel():
            collect(values)


def _classify(s1: tuple[int, ...], s2: tuple[int, ...], p1: tuple[int, int], p2: tuple[int, int]
              ) -> TokenAxes | None:
    """The TokenAxes of a tensor seen with shape ``s1`` at (batch, length) ``p1`` and ``s2`` at ``p2``."""
    if len(s1) != len(s2):
        return None
    (b1, t1), (b2, t2) = p1, p2
    batch, repeat, seqs, flat, static = None, 1, [], None, []
    for axis, (a, c) in enumerate(zip(s1, s2, strict=True)):
        static.append(a if a == c else None)
        if (a, c) == (t1, t2):
            seqs.append(axis)
        elif (a, c) == (b1 * t1, b2 * t2):
            flat = axis
        elif a != c and a % b1 == 0 and c % b2 == 0 and a // b1 == c // b2 and batch is None:
            batch, repeat = axis, a // b1
        elif a != c:
            return None  # a size that follows the inputs some other way
    if flat is not None:
        return TokenAxes(tuple(static), flat=flat) if batch is None and not seqs else None
    if batch is None or not 1 <= len(seqs) <= 2:
        return None
    return TokenAxes(tuple(static), batch=batch, repeat=repeat, seqs=tuple(seqs))


def mask_input(model: nn.Module) -> tuple[str, int, bool] | None:
    """(name, position, whether 1 marks a real position) of the forward's padding-mask argument, or None."""
    names = forward_arity(model)[0]
    for index, name in enumerate(names):
        if name in MASK_INPUTS:
            return name, index, MASK_INPUTS[name]
    return None


@contextlib.contextmanager
def counting_positions(model: nn.Module, quantizers: Mapping[str, TensorQuantizer]) -> Iterator[PositionReport]:
    """While open, the static per-tensor quantizers of ``model`` collect statistics from real positions only,
    in every batch whose padding mask input marks padded positions. Yields the report (filled on exit)."""
    found = mask_input(model)
    wanted = {n: q for n, q in quantizers.items()
              if not q.constant and not q.spec.dynamic and q.spec.axis is None and q.spec.amax is None}
    if found is None or not wanted:
        yield PositionReport()
        return
    positions = _Positions(model, wanted, *found)
    handle = model.register_forward_pre_hook(positions.before_forward, with_kwargs=True)
    for name, q in wanted.items():
        q.calibrator.collect = _bound(positions, name, q.calibrator.collect)
    try:
        yield positions.report
    finally:
        handle.remove()
        for q in wanted.values():
            vars(q.calibrator).pop("collect", None)
        positions.report.padded = positions.padded / positions.seen if positions.seen else 0.0


def _bound(positions: _Positions, name: str, collect: object) -> object:
    def masked(x: torch.Tensor) -> None:
        positions.collect(name, collect, x)
    return masked
