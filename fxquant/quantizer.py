"""Quantization arithmetic and the TensorQuantizer module.

``tensor_quant`` / ``fake_tensor_quant`` keep the semantics of NVIDIA pytorch_quantization: the returned
``scale`` is the multiplier ``max_bound / amax`` (codes = round(x * scale)), and ``outputs / scale``
dequantizes. TensorQuantizer's ``scale`` property instead follows the ONNX / torch convention that the rest
of the stack uses, the step size: ``x ~= (q - zero_point) * scale``, and its forward computes exactly what
QuantizeLinear -> DequantizeLinear (and ``convert``'s frozen op) compute, ``round(x / step)``: ``x * (max_bound /
amax)`` can round the other way at ties (``x * (1 / s)`` and ``x / s`` differ in the last bit), which on
discrete inputs flips whole pixel values between the prepared and the converted model.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.calib import make_calibrator
from fxquant.calib.max import channel_minmax
from fxquant.spec import QuantSpec

_EPS = 1.0 / (1 << 24)  # amax below this counts as zero: the smallest fp16 subnormal
MODES = ("quant", "calib", "disabled")


def _bounds(num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[float, float]:
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    if unsigned:
        return 0.0, max_bound
    return (-max_bound if narrow_range else -max_bound - 1.0), max_bound


def _tensor_quant(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool,
                  narrow_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(float(amax), device=inputs.device)
    amax = amax.float()
    if amax.min() < 0:
        raise ValueError(f"amax must be >= 0, got a minimum of {amax.min().item()}: "
                         "pass the absolute maximum of the tensor (e.g. x.abs().max())")
    min_bound, max_bound = _bounds(num_bits, unsigned, narrow_range)
    scale = max_bound / amax
    zero = amax <= _EPS
    scale = torch.where(zero, torch.zeros_like(scale), scale)  # amax 0 quantizes everything to 0
    outputs = torch.clamp((inputs.float() * scale).round_(), min_bound, max_bound)
    return outputs, torch.where(zero, torch.ones_like(scale), scale)


def tensor_quant(inputs: torch.Tensor, amax: torch.Tensor | float, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric linear quantization: returns the integer codes (as floats) and the scale multiplier.

    ``amax`` is a scalar or a tensor broadcastable to ``inputs`` (per-channel). Codes are
    ``clamp(round(inputs * scale), min_bound, max_bound)`` with ``scale = max_bound / amax``.
    """
    return _tensor_quant(inputs, amax, num_bits, unsigned, narrow_range)


class _FakeTensorQuant(torch.autograd.Function):
    """Targets then dequantize; straight-through gradient where |x| <= amax, zero outside."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits, unsigned, narrow_range):
        amax_t = amax if isinstance(amax, torch.Tensor) else torch.tensor(float(amax), device=inputs.device)
        ctx.save_for_backward(inputs, amax_t)
        outputs, scale = _tensor_quant(inputs, amax_t, num_bits, unsigned, narrow_range)
        return (outputs / scale).to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        inputs, amax = ctx.saved_tensors
        grad_inputs = torch.where(inputs.abs() <= amax, grad_outputs, torch.zeros_like(grad_outputs))
        return grad_inputs, None, None, None, None


def fake_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor | float, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """``tensor_quant`` followed by dequantization, differentiable with a straight-through estimator."""
    return _FakeTensorQuant.apply(inputs, amax, num_bits, unsigned, narrow_range)


class _FakeAffineQuant(torch.autograd.Function):
    """Affine quantize-dequantize; straight-through gradient inside the representable range."""

    @staticmethod
    def forward(ctx, inputs, scale, zero_point, qmin, qmax, fake):
        codes = torch.round(inputs.float() / scale) + zero_point
        ctx.save_for_backward((codes >= qmin) & (codes <= qmax))
        q = torch.clamp(codes, qmin, qmax)
        return ((q - zero_point) * scale).to(inputs.dtype) if fake else q

    @staticmethod
    def backward(ctx, grad_outputs):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs)), None, None, None, None, None


class _FakeSymmetricQuant(torch.autograd.Function):
    """Symmetric quantize(-dequantize) by the step size, as ONNX computes it; the seed's straight-through
    gradient (passes where |x| <= amax); an amax of 0 quantizes to zero, like ``tensor_quant``."""

    @staticmethod
    def forward(ctx, inputs, step, amax, qmin, qmax, fake):
        ctx.save_for_backward(inputs.abs() <= amax)
        codes = torch.clamp(torch.round(inputs.float() / step), qmin, qmax)
        codes = torch.where(amax <= _EPS, torch.zeros_like(codes), codes)
        return (codes * step).to(inputs.dtype) if fake else codes

    @staticmethod
    def backward(ctx, grad_outputs):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_outputs, torch.zeros_like(grad_outputs)), None, None, None, None, None


def _safe_step(step: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """A range narrower than _EPS (all-zero data) gets step 1: zero stays exactly zero, and the step stays a
    sane number for runtimes that derive int32 bias scales from it (a 1e-10 step overflows them)."""
    return torch.where(span <= _EPS, torch.ones_like(step), step)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and integer zero point for the range [lo, hi], widened to include 0."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale = _safe_step((hi - lo) / (qmax - qmin), hi - lo)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def broadcast_shape(x: torch.Tensor, axis: int | None, values: torch.Tensor) -> torch.Tensor:
    """Reshape per-channel ``values`` so they broadcast along ``axis`` of ``x``."""
    if axis is None or values.dim() == 0:
        return values
    shape = [1] * x.dim()
    shape[axis] = -1
    return values.reshape(shape)


class TensorQuantizer(nn.Module):
    """Calibrates, fake-quantizes (straight-through gradient) or passes a tensor through.

    Modes: ``"quant"`` (default), ``"calib"`` (collect statistics, return the input unchanged) and
    ``"disabled"``. Without a range (no fixed amax, not calibrated) quant mode uses the range of the current
    input, as pytorch_quantization does.

    ``constant`` is True for a quantizer of a parameter or buffer (a module's weight, a layer scale): its
    statistics are complete after one batch, and it never sees values outside its calibrated range.
    """

    constant = False

    def __init__(self, spec: QuantSpec | None = None, constant: bool = False) -> None:
        super().__init__()
        spec = QuantSpec() if spec is None else spec
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"TensorQuantizer takes a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.constant = constant
        self.mode = "quant"
        self.calibrator = make_calibrator(spec)
        self.register_buffer("_min", None)
        self.register_buffer("_max", None)
        self._range_device: torch.device | None = None  # where .to()/.cuda() moved it; see _load_from_state_dict
        if spec.amax is not None:
            self._set_range(-torch.tensor(float(spec.amax)), torch.tensor(float(spec.amax)))

    # ---- state -------------------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown TensorQuantizer mode {mode!r}; valid modes: {MODES}")
        self.mode = mode

    @property
    def is_calibrated(self) -> bool:
        """True when the range is known (a fixed amax or a finished calibration)."""
        return self._max is not None

    def _set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.spec.scale_amax is not None:
            lo, hi = lo * self.spec.scale_amax, hi * self.spec.scale_amax
        device = next((b.device for b in (self._min, self._max) if b is not None), lo.device)
        self._min, self._max = lo.float().to(device), hi.float().to(device)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        # Remember the device the module was moved to while it has no range buffers yet, so that a range
        # loaded from a state dict lands there and not on the state dict's device.
        try:
            self._range_device = fn(torch.empty(0, device=getattr(self, "_range_device", None))).device
        except Exception:  # a function that cannot take a stray tensor: keep the last known device
            pass
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # An uncalibrated quantizer holds its range buffers as None, which nn.Module neither saves nor loads:
        # give them the incoming shape first, so a calibrated model's state dict loads (strict) into a fresh
        # prepare of the same model and the loaded model counts as calibrated.
        keys = {name: prefix + name for name in ("_min", "_max")}
        present = {name for name, key in keys.items() if key in state_dict}
        if present and all(getattr(self, name) is None for name in keys):
            if len(present) == 1:
                error_msgs.append(f"{prefix}_min and {prefix}_max are a pair, but the state dict holds only "
                                  f"{keys[present.pop()]}")
                return
            lo, hi = state_dict[keys["_min"]], state_dict[keys["_max"]]
            dims = 0 if self.spec.axis is None else 1
            if not (isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor)) or lo.shape != hi.shape \
                    or lo.dim() != dims:
                error_msgs.append(f"{prefix}_min/_max: expected two {'scalar' if dims == 0 else '1-D per-channel'} "
                                  f"tensors of the same shape for this {'per-tensor' if dims == 0 else 'per-channel'}"
                                  f" quantizer, got shapes {tuple(getattr(lo, 'shape', ()))} and "
                                  f"{tuple(getattr(hi, 'shape', ()))}; load the state dict of the same model "
                                  "prepared with the same backend and config")
                return
            device = getattr(self, "_range_device", None) or lo.device
            self._min = torch.empty(lo.shape, dtype=torch.float32, device=device)
            self._max = torch.empty(hi.shape, dtype=torch.float32, device=device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_calib_amax(self, method: str | None = None) -> None:
        """Turn the calibrator's statistics into this quantizer's range, with ``method`` (default: the spec's
        ``calib_method``); any method the calibrator's statistics support works without re-running data."""
        if self.spec.amax is not None:
            return
        method = method or self.spec.calib_method
        if method not in self.calibrator.methods:
            raise ValueError(f"a {type(self.calibrator).__name__} cannot derive a {method!r} range (it can: "
                             f"{list(self.calibrator.methods)}); calibrate with calib_method='percentile', "
                             "'entropy' or 'mse' to keep a histogram that serves all of them")
        lo, hi = self.calibrator.compute(self.spec, method)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("calibration produced a NaN or infinite range: the model emits NaN/Inf "
                             "on the calibration data; check the data and the model")
        self._set_range(lo, hi)

    @property
    def amax(self) -> torch.Tensor | None:
        """Symmetric range limit max(|min|, |max|): a scalar or one value per channel."""
        if self._max is None:
            return None
        return torch.maximum(self._min.abs(), self._max.abs())

    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            return _safe_step(amax / spec.qmax, amax), torch.zeros_like(amax)
        return affine_qparams(lo, hi, spec.qmin, spec.qmax)

    @property
    def scale(self) -> torch.Tensor | None:
        """Step size: ``x ~= (q - zero_point) * scale``."""
        return None if self._max is None else self._qparams(self._min, self._max)[0]

    @property
    def zero_point(self) -> torch.Tensor | None:
        """Integer zero point (0 for symmetric specs)."""
        return None if self._max is None else self._qparams(self._min, self._max)[1]

    # ---- forward -----------------------------------------------------------------------------------
    def _axis(self, x: torch.Tensor) -> int | None:
        axis = self.spec.axis
        if axis is None:
            return None
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"QuantSpec.axis={axis} is out of range for a tensor of shape {tuple(x.shape)}")
        return axis % x.dim()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "disabled":
            return x
        axis = self._axis(x)
        if self.mode == "calib":
            if self.spec.amax is None:
                self.calibrator.collect(x)
            return x
        if self._max is None:
            lo, hi = channel_minmax(x, axis)
        else:
            lo, hi = self._min, self._max
        spec = self.spec
        if spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs()).float()
            step = _safe_step(amax / spec.qmax, amax)  # the `scale` property, as convert freezes it
            return _FakeSymmetricQuant.apply(x, broadcast_shape(x, axis, step), broadcast_shape(x, axis, amax),
                                             spec.qmin, spec.qmax, spec.fake_quant)
        scale, zero_point = affine_qparams(lo, hi, spec.qmin, spec.qmax)
        scale, zero_point = broadcast_shape(x, axis, scale), broadcast_shape(x, axis, zero_point)
        return _FakeAffineQuant.apply(x, scale, zero_point, spec.qmin, spec.qmax, spec.fake_quant)

    def extra_repr(self) -> str:
        spec = self.spec
        kind = "sym" if spec.symmetric else "affine"
        axis = "per-tensor" if spec.axis is None else f"axis={spec.axis}"
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        return f"{spec.num_bits}-bit {kind} [{spec.qmin}, {spec.qmax}] {axis} {spec.calib_method} {self.mode} {state}"
