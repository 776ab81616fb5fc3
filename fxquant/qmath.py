"""The one quantize/dequantize arithmetic of fxquant: integer ranges, scales, zero points, codes, fake quant.

Two conventions meet here, and each has one function:

- the **step** (ONNX's and torch's ``scale``): ``x ~= (q - zero_point) * step`` and ``q = clamp(round(x / step)
  + zero_point, qmin, qmax)``, exactly what QuantizeLinear -> DequantizeLinear compute (division, round half to
  even, saturate). TensorQuantizer, the converted model's Q/DQ op, QAT, the calibrators' error searches, AdaRound
  and export's weight folding all quantize this way, so the prepared, converted and exported models agree bit for
  bit;
- the **multiplier** of NVIDIA pytorch_quantization's ``tensor_quant``: ``multiplier = max_bound / amax``
  computed by true division, as NVIDIA computes it (torch's ``number / tensor`` would compute
  ``amax.reciprocal() * number``, one ulp off for about a quarter of the amax values), and ``q = clamp(round(x *
  multiplier), min_bound, max_bound)``.

An amax (or range) below ``EPS`` counts as zero: symmetric quantization of it gives all-zero codes, and its step
is 1 (a sane number for runtimes that derive int32 bias scales from it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxquant.errors import QuantRangeError

EPS = 1.0 / (1 << 24)  # the smallest fp16 subnormal
Rounding = Callable[[torch.Tensor], torch.Tensor]


# ---- integer ranges --------------------------------------------------------------------------------------------
def qrange(num_bits: int, unsigned: bool = False, narrow_range: bool = False,
           symmetric: bool = True) -> tuple[int, int]:
    """``(qmin, qmax)``: signed symmetric ``[-2^(b-1), 2^(b-1) - 1]`` (narrow: without its lowest code), unsigned
    symmetric ``[0, 2^b - 1]``, affine ``[0, 2^b - 1]``."""
    if not symmetric:
        return 0, 2**num_bits - 1
    qmax = 2 ** (num_bits - 1 + int(unsigned)) - 1
    if unsigned:
        return 0, qmax
    return (-qmax if narrow_range else -qmax - 1), qmax


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32, except that float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


# ---- scales and zero points --------------------------------------------------------------------------------------
def multiplier(amax: torch.Tensor, max_bound: float) -> torch.Tensor:
    """NVIDIA's scale ``max_bound / amax`` by true division (float32); 0 where ``amax <= EPS``."""
    amax = amax.float()
    scale = torch.div(torch.full_like(amax, max_bound), amax)
    return torch.where(amax <= EPS, torch.zeros_like(scale), scale)


def safe_step(step: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``step``, or 1 where the range ``span`` is below EPS (all-zero data): zero stays exactly zero."""
    return torch.where(span <= EPS, torch.ones_like(step), step)


def symmetric_step(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """The step of the symmetric range ``[-amax, amax]`` over ``qmax`` positive codes."""
    amax = _float(amax)
    return safe_step(amax / qmax, amax)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                   rounding: Rounding = torch.round) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and integer zero point of the range ``[lo, hi]`` widened to hold 0 (so 0 is exactly representable)."""
    lo, hi = torch.clamp(_float(lo), max=0.0), torch.clamp(_float(hi), min=0.0)
    step = safe_step((hi - lo) / (qmax - qmin), hi - lo)
    zero_point = torch.clamp(qmin - rounding(lo / step), qmin, qmax)
    return step, zero_point


def qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Step and zero point of the range ``[lo, hi]``: symmetric (zero point 0, amax = max(|lo|, |hi|)) or affine."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return symmetric_step(amax, qmax), torch.zeros_like(amax, dtype=torch.float32)
    return affine_qparams(lo, hi, qmin, qmax)


def along_axis(values: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape per-channel ``values`` so that they broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    if axis is None or values.dim() == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


# ---- codes -----------------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int,
             rounding: Rounding = torch.round) -> torch.Tensor:
    """Integer codes as floats: ``clamp(round(x / step) + zero_point)``, round half to even, as QuantizeLinear.
    Computed in float32, as the runtimes do (in float64 when both ``x`` and ``step`` are float64)."""
    x = x if x.dtype == step.dtype == torch.float64 else x.float()
    return torch.clamp(rounding(x / step) + zero_point, qmin, qmax)


def dequantize(codes: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    """``(codes - zero_point) * step``, as DequantizeLinear."""
    return (codes - zero_point) * step


def fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | float, qmin: int,
                  qmax: int, rounding: Rounding = torch.round) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32 (float64 inputs stay float64); no gradient handling."""
    return dequantize(quantize(x, step, zero_point, qmin, qmax, rounding), step, zero_point)


def fake_quant_minmax(x: torch.Tensor, num_bits: int, symmetric: bool, dim: int | None = None) -> torch.Tensor:
    """Fake quantization with ``x``'s own min/max range, per tensor (``dim`` None) or per slice along ``dim``:
    symmetric (codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``) or affine (``[0, 2^b - 1]``, the range widened to hold 0).
    The PTQ searches (SmoothQuant's alpha, the outlier split) score candidates with it."""
    reduce = {} if dim is None else {"dim": tuple(d for d in range(x.dim()) if d != dim), "keepdim": True}
    if symmetric:
        qmax = 2 ** (num_bits - 1) - 1
        amax = x.abs().amax(**reduce) if reduce else x.abs().max()
        return fake_quantize(x, symmetric_step(amax, qmax), 0.0, -qmax, qmax)
    qmin, qmax = qrange(num_bits, symmetric=False)
    lo, hi = (x.amin(**reduce), x.amax(**reduce)) if reduce else (x.min(), x.max())
    step, zero_point = affine_qparams(lo, hi, qmin, qmax)
    return fake_quantize(x, step, zero_point, qmin, qmax)


def quantize_by_multiplier(x: torch.Tensor, scale: torch.Tensor, min_bound: float, max_bound: float) -> torch.Tensor:
    """NVIDIA's codes ``clamp(round(x * scale), min_bound, max_bound)`` in float32."""
    return torch.clamp((x.float() * scale).round_(), min_bound, max_bound)


def check_amax(amax: torch.Tensor) -> None:
    """Raise when an amax is negative."""
    if amax.numel() and bool(amax.min() < 0):
        raise QuantRangeError(f"amax must be >= 0, got a minimum of {amax.min().item()}: pass the absolute maximum "
                              "of the tensor (e.g. x.abs().max())")


# ---- fake quantization with a straight-through gradient ---------------------------------------------------------
class _FakeQuant(torch.autograd.Function):
    """Quantize(-dequantize) by the step; the gradient passes where ``inside`` (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, zeroed, inside, fake):
        codes = quantize(x, step, zero_point, qmin, qmax)
        if zeroed is not None:
            codes = torch.where(zeroed, torch.zeros_like(codes), codes)
        ctx.save_for_backward(inside)
        return (dequantize(codes, step, zero_point) if fake else codes).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, torch.zeros_like(grad)), None, None, None, None, None, None, None


def fake_quant_symmetric(x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int, fake: bool = True) -> torch.Tensor:
    """Symmetric quantize(-dequantize) of ``x`` with ``amax`` broadcastable to it; an amax below EPS gives zeros;
    straight-through gradient where ``|x| <= amax``, zero outside (pytorch_quantization's estimator)."""
    amax = amax.float()
    if not (torch.is_grad_enabled() and x.requires_grad):  # no gradient: the same values in three passes
        step = symmetric_step(amax, qmax)
        codes = (x.double() if x.dtype == step.dtype == torch.float64 else x.float()) / step
        codes = codes.round_().clamp_(qmin, qmax).masked_fill_(amax <= EPS, 0.0)
        return (codes.mul_(step) if fake else codes).to(x.dtype)
    return _FakeQuant.apply(x, symmetric_step(amax, qmax), 0.0, qmin, qmax, amax <= EPS, x.abs() <= amax, fake)


def fake_quant_affine(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      fake: bool = True) -> torch.Tensor:
    """Affine quantize(-dequantize); straight-through gradient where the unclamped code lies in [qmin, qmax]."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # no gradient: the same values, in place
        codes = (x.double() if x.dtype == step.dtype == torch.float64 else x.float()) / step
        codes = codes.round_().add_(zero_point).clamp_(qmin, qmax)
        return (codes.sub_(zero_point).mul_(step) if fake else codes).to(x.dtype)
    with torch.no_grad():
        codes = torch.round(x.float() / step) + zero_point
    return _FakeQuant.apply(x, step, zero_point, qmin, qmax, None, (codes >= qmin) & (codes <= qmax), fake)


# ---- dynamic (per-forward) uint8 ranges, as ONNX DynamicQuantizeLinear ----------------------------------------
DYNAMIC_QMIN, DYNAMIC_QMAX = 0, 255


def dynamic_qparams(x: torch.Tensor, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of ``x``'s own range, as ONNX Runtime's DynamicQuantizeLinear computes them:
    the range widened to hold 0, ``step = (max - min) / 255`` (1 when the range is empty), ``zero_point =
    round(clamp(-min / step, 0, 255))`` (half to even). ``per_token``: one range per row (all but the last axis),
    shaped to broadcast against ``x``; else one per tensor."""
    x = x.detach().float()
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.min(), x.max()
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    step = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / (DYNAMIC_QMAX - DYNAMIC_QMIN))
    zero_point = torch.round(torch.clamp(DYNAMIC_QMIN - lo / step, DYNAMIC_QMIN, DYNAMIC_QMAX))
    return step, zero_point


def fake_quant_dynamic(x: torch.Tensor, per_token: bool = False, fake: bool = True) -> torch.Tensor:
    """uint8 quantize(-dequantize) of ``x`` with its own range (``dynamic_qparams``); straight-through gradient
    everywhere (the range always holds the data)."""
    step, zero_point = dynamic_qparams(x, per_token)
    inside = torch.ones_like(x, dtype=torch.bool)
    return _FakeQuant.apply(x, step, zero_point, DYNAMIC_QMIN, DYNAMIC_QMAX, None, inside, fake)
