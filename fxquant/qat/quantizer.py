"""QATQuantizer: a TensorQuantizer that keeps training its range (LSQ), tracks it (EMA) or keeps it fixed.

Learned ranges (``QuantSpec.learn_amax=True``) follow LSQ (Esser et al. 2020): the quantizer's ``_min`` and
``_max`` become ``nn.Parameter``s (same names as the calibrated buffers, so state dicts, encodings and
``convert`` read them unchanged), the forward pass is written with a straight-through ``round`` so that autograd
gives LSQ's step-size gradient, and the gradient reaching the range is scaled by ``1 / sqrt(N * Qp)`` (N: elements
per scale, per sample for activations; Qp: the largest code).

- Symmetric specs learn ``amax``: ``_min = -_max`` at the start and ``amax = max(|_min|, |_max|)``; the step is
  ``amax / qmax``.
- Affine specs learn ``min`` and ``max``: the step is ``(max - min) / (qmax - qmin)`` (the range widened to hold 0)
  and the zero point ``round(qmin - min / step)`` goes through the same straight-through rounding, so the forward
  is bit for bit what ``convert`` freezes into QuantizeLinear/DequantizeLinear with an integer zero point. Both ends
  get LSQ's gradient: codes clipped at the top pull ``max`` up, codes clipped at the bottom pull ``min`` down.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant import qmath
from fxquant.calib.max import channel_minmax
from fxquant.quantizer import TensorQuantizer
from fxquant.spec import QuantSpec

RANGE_MODES = ("fixed", "ema")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def lsq_fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, axis: int | None,
                   grad_factor: float) -> torch.Tensor:
    """Fake-quantize ``x`` with the learnable range [lo, hi]; gradients reach x (STE), lo and hi (LSQ)."""
    lo, hi = grad_scale(lo, grad_factor), grad_scale(hi, grad_factor)
    if spec.symmetric:  # an empty range gets step 1, as calibration gives it
        step = qmath.symmetric_step(torch.maximum(lo.abs(), hi.abs()), spec.qmax)
        zero_point = torch.zeros_like(step)
    else:
        step, zero_point = qmath.affine_qparams(lo, hi, spec.qmin, spec.qmax, rounding=round_ste)
    step, zero_point = qmath.along_axis(step, x.dim(), axis), qmath.along_axis(zero_point, x.dim(), axis)
    return qmath.fake_quantize(x, step, zero_point, spec.qmin, spec.qmax, rounding=round_ste).to(x.dtype)


class QATQuantizer(TensorQuantizer):
    """A TensorQuantizer for quantization-aware training (made by ``fxquant.prepare_qat``).

    In training mode (``model.train()``) each forward of the model counts a step; with ``ranges="ema"`` a range
    that is not learned follows the batches (activations: ``decay * range + (1 - decay) * batch min/max``, as
    Distiller's QuantAwareTrainRangeLinearQuantizer and torch.ao's moving-average observers do; weights: their current
    min/max); after ``freeze_after`` steps the range stops changing (a learned range is copied into the ``_min``
    / ``_max`` buffers; its parameters remain, as ``learned_min`` / ``learned_max``, with zero gradient). In
    eval mode nothing changes. The step count and the frozen flag are buffers, so they travel in state dicts.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool, ranges: str = "fixed", ema_decay: float = 0.99,
                 freeze_after: int | None = None) -> None:
        super().__init__(spec, constant=is_weight)
        self.is_weight = is_weight
        self.ranges = ranges
        self.ema_decay = ema_decay
        self.freeze_after = freeze_after
        self.register_buffer("qat_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ranges_frozen", torch.zeros((), dtype=torch.bool))
        if self._learning_ready():
            self._to_parameters(symmetrize=True)

    # ---- range storage -----------------------------------------------------------------------------
    @property
    def learns_range(self) -> bool:
        """True while the range is a trained parameter (learn_amax and not frozen)."""
        return isinstance(self._max, nn.Parameter)

    def _learning_ready(self) -> bool:
        """A learned range that is still held in buffers (during __init__ the flags do not exist yet)."""
        frozen = self.__dict__.get("_buffers", {}).get("ranges_frozen")
        return (self.spec.learn_amax and frozen is not None and not bool(frozen) and self._max is not None
                and self._min is not None and not self.learns_range)

    def _to_parameters(self, symmetrize: bool) -> None:
        lo, hi = self._min.detach().clone(), self._max.detach().clone()
        if symmetrize and self.spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -amax, amax
        del self._buffers["_min"], self._buffers["_max"]
        self._min, self._max = nn.Parameter(lo), nn.Parameter(hi)

    def __setattr__(self, name: str, value: object) -> None:
        # Code that sets a range directly (load_encodings) keeps a learned range a parameter: copy into it, or
        # turn the range into parameters once both ends are set.
        params = self.__dict__.get("_parameters", {})
        if name in ("_min", "_max") and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            if isinstance(params.get(name), nn.Parameter):
                with torch.no_grad():
                    params[name].copy_(value)
                return
            super().__setattr__(name, value)
            if self._learning_ready():
                self._to_parameters(symmetrize=False)
            return
        super().__setattr__(name, value)

    def _set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.learns_range:  # a new calibration of a learned range: start from it
            if self.spec.scale_amax is not None:
                lo, hi = lo * self.spec.scale_amax, hi * self.spec.scale_amax
            with torch.no_grad():
                if self.spec.symmetric:
                    amax = torch.maximum(lo.abs(), hi.abs())
                    lo, hi = -amax, amax
                self._min.copy_(lo)
                self._max.copy_(hi)
            return
        if self.spec.learn_amax and self.spec.symmetric:  # a learned amax starts as a symmetric range
            amax = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -amax, amax
        super()._set_range(lo, hi)  # __setattr__ makes a learned range parameters

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        frozen = state_dict.get(prefix + "ranges_frozen")
        if frozen is not None and bool(frozen) and self.spec.learn_amax:  # a range learned, then frozen
            if self.learns_range:
                self.freeze()
            elif "learned_min" not in self._parameters and prefix + "learned_min" in state_dict:
                self.ranges_frozen.fill_(True)  # the range loads into buffers
                self.learned_min = nn.Parameter(torch.empty_like(state_dict[prefix + "learned_min"]))
                self.learned_max = nn.Parameter(torch.empty_like(state_dict[prefix + "learned_max"]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._learning_ready():
            self._to_parameters(symmetrize=False)

    def freeze(self) -> None:
        """Stop changing the range: EMA stops, a learned range becomes a buffer holding its current value."""
        if self.learns_range:
            # The parameters stay registered (as learned_min/max) and in the graph with a zero gradient: the
            # optimizer, DistributedDataParallel and a resumed optimizer state still find the same parameters.
            lo, hi = self._min, self._max
            del self._parameters["_min"], self._parameters["_max"]
            self.register_buffer("_min", lo.detach().clone())
            self.register_buffer("_max", hi.detach().clone())
            self.learned_min, self.learned_max = lo, hi
        self.ranges_frozen.fill_(True)

    def count_step(self) -> None:
        """One training step (called once per model forward in training mode); ``qat_steps`` counts the steps
        that changed the range, so it stops at ``freeze_after``."""
        if bool(self.ranges_frozen):
            return
        if self.freeze_after is not None and int(self.qat_steps) >= self.freeze_after:
            self.freeze()
        else:
            self.qat_steps += 1

    # ---- forward -----------------------------------------------------------------------------------
    def _grad_factor(self, x: torch.Tensor) -> float:
        per_scale = x.numel() / max(self._max.numel(), 1)
        if not self.is_weight and x.dim() > 1:
            per_scale /= x.shape[0]  # LSQ's N for activations: features per sample
        return 1.0 / math.sqrt(max(per_scale, 1.0) * self.spec.qmax)

    @torch.no_grad()
    def _track(self, x: torch.Tensor, axis: int | None) -> None:
        lo, hi = channel_minmax(x.detach(), axis)
        if self.spec.scale_amax is not None:
            lo, hi = lo * self.spec.scale_amax, hi * self.spec.scale_amax
        decay = 0.0 if self.is_weight else self.ema_decay
        self._min.mul_(decay).add_(lo.float(), alpha=1 - decay)
        self._max.mul_(decay).add_(hi.float(), alpha=1 - decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant" or self._max is None:
            return super().forward(x)
        frozen = bool(self.ranges_frozen)
        if self.learns_range:
            return lsq_fake_quant(x, self._min, self._max, self.spec, self._axis(x), self._grad_factor(x))
        if self.training and not frozen and self.ranges == "ema":
            self._track(x, self._axis(x))
        out = super().forward(x)
        if "learned_min" in self._parameters and torch.is_grad_enabled():  # frozen: a zero gradient (for DDP)
            out = out + 0.0 * (self.learned_min.sum() + self.learned_max.sum())
        return out

    def extra_repr(self) -> str:
        how = "learned" if self.learns_range else ("frozen" if bool(self.ranges_frozen) else self.ranges)
        return f"{super().extra_repr()} qat={how} steps={int(self.qat_steps)}"
