"""pytorch_quantization's ``tensor_quant`` / ``fake_tensor_quant`` and the TensorQuantizer module.

``tensor_quant`` / ``fake_tensor_quant`` keep the semantics of NVIDIA pytorch_quantization: the returned
``scale`` is the multiplier ``max_bound / amax`` (by division, as NVIDIA computes it; codes = round(x * scale)),
``outputs / scale`` dequantizes, the gradient passes straight through where ``|x| <= amax``, float16/bfloat16
inputs give codes and scale in their own dtype (fake quantization computes in float32 and casts the result, as
NVIDIA's CUDA kernel does), and unsigned quantization of negative values raises.

TensorQuantizer deliberately differs in one point: its ``scale`` is the step size of ONNX and torch, ``x ~= (q -
zero_point) * scale``, and its forward computes exactly what QuantizeLinear -> DequantizeLinear (and ``convert``'s
frozen op) compute, ``round(x / step)``. NVIDIA's ``x * (max_bound / amax)`` can round the other way where ``x /
step`` lies within an ulp of a half (``x * (1 / s)`` and ``x / s`` differ in the last bit), which would flip codes
between the prepared and the converted model. The arithmetic lives in ``fxquant.qmath``.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant import qmath
from fxquant.calib import make_calibrator
from fxquant.calib.max import channel_minmax
from fxquant.errors import ConfigError, ConfigTypeError, NegativeInputError, QuantRangeError
from fxquant.spec import QuantSpec

MODES = ("quant", "calib", "disabled")
_FP16_MAX = 65504.0


def _check_unsigned(inputs: torch.Tensor) -> None:
    if inputs.numel() and bool(inputs.min() < 0):
        raise NegativeInputError("Negative values encountered in unsigned quantization: an unsigned quantizer "
                                 f"covers [0, amax], but the input's minimum is {inputs.min().item()}; quantize "
                                 "this tensor with unsigned=False, or quantize a non-negative tensor (after a ReLU)")


def _nvidia_quant(inputs: torch.Tensor, amax: torch.Tensor | float, num_bits: int, unsigned: bool,
                  narrow_range: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and multiplier in float32, and the float amax on the input's device."""
    amax = torch.as_tensor(amax, device=inputs.device).to(inputs.device).float()
    qmath.check_amax(amax)
    if unsigned:
        _check_unsigned(inputs)
    qmin, qmax = qmath.qrange(num_bits, unsigned, narrow_range)
    scale = qmath.multiplier(amax, qmax)
    codes = qmath.quantize_by_multiplier(inputs, scale, qmin, qmax)
    return codes, torch.where(amax <= qmath.EPS, torch.ones_like(scale), scale), amax


def _pass_inside(inputs: torch.Tensor, amax: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.where(inputs.abs() <= amax, grad, torch.zeros_like(grad))


class _TensorQuant(torch.autograd.Function):
    """Codes and multiplier; straight-through gradient where |x| <= amax, zero outside."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits, unsigned, narrow_range):
        codes, scale, amax_t = _nvidia_quant(inputs, amax, num_bits, unsigned, narrow_range)
        if inputs.dtype == torch.float16 and scale.numel() and bool(scale.max() > _FP16_MAX):
            raise QuantRangeError(f"scale is too large for FP16 with amax={amax_t.min().item():g}: the multiplier "
                                  f"{scale.max().item():g} exceeds float16's maximum {_FP16_MAX:g}; quantize the "
                                  "float32 tensor or use a larger amax")
        ctx.save_for_backward(inputs, amax_t)
        return codes.to(inputs.dtype), scale.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_codes, grad_scale):
        inputs, amax = ctx.saved_tensors
        return _pass_inside(inputs, amax, grad_codes), None, None, None, None


def tensor_quant(inputs: torch.Tensor, amax: torch.Tensor | float, num_bits: int = 8, unsigned: bool = False,
                 narrow_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric linear quantization: returns the integer codes (as floats) and the scale multiplier.

    ``amax`` is a scalar or a tensor broadcastable to ``inputs`` (per-channel). Codes are
    ``clamp(round(inputs * scale), min_bound, max_bound)`` with ``scale = max_bound / amax`` (true division);
    both are in the input's dtype (a float16 scale above 65504 raises ``QuantRangeError``). Gradient: straight
    through where ``|inputs| <= amax``, zero outside. ``unsigned=True`` with a negative input raises
    ``NegativeInputError`` (a TypeError); an amax of 0 gives zero codes and scale 1.
    """
    return _TensorQuant.apply(inputs, amax, num_bits, unsigned, narrow_range)


class _FakeTensorQuant(torch.autograd.Function):
    """Targets then dequantize; straight-through gradient where |x| <= amax, zero outside."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits, unsigned, narrow_range):
        codes, scale, amax_t = _nvidia_quant(inputs, amax, num_bits, unsigned, narrow_range)
        ctx.save_for_backward(inputs, amax_t)
        return (codes / scale).to(inputs.dtype)  # in float32, then cast: NVIDIA's CUDA kernel for fp16/bf16

    @staticmethod
    def backward(ctx, grad_outputs):
        inputs, amax = ctx.saved_tensors
        return _pass_inside(inputs, amax, grad_outputs), None, None, None, None


def fake_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor | float, num_bits: int = 8, unsigned: bool = False,
                      narrow_range: bool = True) -> torch.Tensor:
    """``tensor_quant`` followed by dequantization (``codes / scale`` computed in float32, then cast to the input's
    dtype, as NVIDIA's CUDA kernel computes fp16/bf16), differentiable with a straight-through estimator."""
    return _FakeTensorQuant.apply(inputs, amax, num_bits, unsigned, narrow_range)


class TensorQuantizer(nn.Module):
    """Calibrates, fake-quantizes (straight-through gradient) or passes a tensor through.

    Modes: ``"quant"`` (default), ``"calib"`` (collect statistics, return the input unchanged) and
    ``"disabled"``. Without a range (no fixed amax, not calibrated) quant mode uses the range of the current
    input times ``scale_amax``, as pytorch_quantization does; ``scale`` and ``zero_point`` then report that
    forward's values, while ``amax`` stays None (nothing is calibrated). ``amax`` can be set (``q.amax = 0.577``:
    the range becomes ``[-0.577, 0.577]``, used as given, without ``scale_amax``). An unsigned spec raises
    ``NegativeInputError`` on a negative input in quant mode. The range follows the input's device.

    Differences from pytorch_quantization's TensorQuantizer, by design: ``scale`` is the step size
    (``amax / max_bound``, the ONNX scale), not the multiplier ``max_bound / amax``, and codes are ``round(x /
    step)`` as QuantizeLinear computes them (see the module docstring).

    ``constant`` is True for a quantizer of a parameter or buffer (a module's weight, a layer scale): its
    statistics are complete after one batch, and it never sees values outside its calibrated range.
    """

    constant = False

    def __init__(self, spec: QuantSpec | None = None, constant: bool = False) -> None:
        super().__init__()
        spec = QuantSpec() if spec is None else spec
        if not isinstance(spec, QuantSpec):
            raise ConfigTypeError(f"TensorQuantizer takes a QuantSpec, got {type(spec).__name__}")
        self.register_buffer("_num_bits", torch.tensor(spec.num_bits))
        self.spec = spec
        self.constant = constant
        self.mode = "quant"
        self.calibrator = make_calibrator(spec)
        self.register_buffer("_min", None)
        self.register_buffer("_max", None)
        self._input_range: tuple[torch.Tensor, torch.Tensor] | None = None  # the last forward's own range
        self._range_device: torch.device | None = None  # where .to()/.cuda() moved it; see _load_from_state_dict
        if spec.amax is not None:
            self._set_range(-torch.tensor(float(spec.amax)), torch.tensor(float(spec.amax)))

    # ---- state -------------------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown TensorQuantizer mode {mode!r}; valid modes: {MODES}")
        self.mode = mode

    @property
    def is_calibrated(self) -> bool:
        """True when the range is known (a fixed amax or a finished calibration) or needs none (dynamic)."""
        return self._max is not None or self.spec.dynamic

    def _scaled(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.spec.scale_amax
        return (lo, hi) if factor is None else (lo * factor, hi * factor)

    def _set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._store_range(*self._scaled(lo, hi))

    def _store_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        device = next((b.device for b in (self._min, self._max) if b is not None), lo.device)
        self._min, self._max = lo.float().to(device), hi.float().to(device)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        # Remember the device the module was moved to while it has no range buffers yet, so that a range
        # loaded from a state dict lands there and not on the state dict's device.
        try:
            self._range_device = fn(torch.empty(0, device=getattr(self, "_range_device", None))).device
        except Exception:  # a function that cannot take a stray tensor: keep the last known device
            pass
        self._input_range = None  # the last forward's own range stays where it was computed: forget it
        return super()._apply(fn, recurse)

    @property
    def spec(self) -> QuantSpec:
        """How this quantizer quantizes. Its bit width is also the ``_num_bits`` buffer, so the width travels with
        the range in the state dict (a calibration step may choose it per layer: the onnxruntime preset's
        saturation-aware weights)."""
        return self._spec

    @spec.setter
    def spec(self, value: QuantSpec) -> None:
        self._spec = value
        if "_num_bits" in self._buffers:
            self._num_bits.fill_(value.num_bits)

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
        state_dict.setdefault(prefix + "_num_bits", self._num_bits.clone())  # state dicts saved before the width
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self._num_bits.is_meta and int(self._num_bits) != self._spec.num_bits:
            self._spec = self._spec.with_(num_bits=int(self._num_bits))

    def load_calib_amax(self, method: str | None = None) -> None:
        """Turn the calibrator's statistics into this quantizer's range, with ``method`` (default: the spec's
        ``calib_method``); any method the calibrator's statistics support works without re-running data."""
        if self.spec.amax is not None:
            return
        method = method or self.spec.calib_method
        if method not in self.calibrator.methods:
            raise ConfigError(f"a {type(self.calibrator).__name__} cannot derive a {method!r} range (it can: "
                              f"{list(self.calibrator.methods)}); calibrate with calib_method='percentile', "
                              "'entropy' or 'mse' to keep a histogram that serves all of them")
        lo, hi = self.calibrator.compute(self.spec, method)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ConfigError("calibration produced a NaN or infinite range: the model emits NaN/Inf "
                              "on the calibration data; check the data and the model")
        low = (self.calibrator.minmax() or (None,))[0]  # the data's own minimum, whatever range compute proposes
        if self.spec.unsigned and low is not None and low.numel() and bool(low.min() < 0):
            raise NegativeInputError(f"Negative values encountered in unsigned quantization: the calibration data "
                                     f"reaches {low.min().item():.4g}, which an unsigned quantizer ([0, amax]) clips "
                                     "to 0; use unsigned=False (or symmetric=False for an affine range) for this "
                                     "tensor, or keep unsigned=True for tensors after a ReLU only")
        self._set_range(lo, hi)

    @property
    def amax(self) -> torch.Tensor | None:
        """Symmetric range limit max(|min|, |max|): a scalar or one value per channel."""
        if self._max is None:
            return None
        return torch.maximum(self._min.abs(), self._max.abs())

    @amax.setter
    def amax(self, value: torch.Tensor | float | list) -> None:
        """Set the range to ``[-value, value]`` (a number, or one value per channel), as given."""
        device = next((b.device for b in (self._min, self._max) if b is not None), self._range_device)
        amax = torch.as_tensor(value, dtype=torch.float32, device=device).detach().clone()
        qmath.check_amax(amax)
        if amax.dim() != (0 if self.spec.axis is None else 1):
            if self.spec.axis is None:  # NVIDIA infers the granularity from amax's shape; the spec fixes it here
                raise QuantRangeError(f"amax of shape {tuple(amax.shape)} does not fit this per-tensor quantizer "
                                      "(QuantSpec(axis=None): one scale, as a per-tensor QuantizeLinear holds): give "
                                      "one number, or one value per channel of the last axis with "
                                      "QuantSpec(axis=-1) (pytorch_quantization broadcasts such an amax instead)")
            raise QuantRangeError(f"amax of shape {tuple(amax.shape)} does not fit this per-channel quantizer: give "
                                  "one value per channel (1-D)")
        self._store_range(-amax, amax)

    def _current_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self._min, self._max) if self._max is not None else getattr(self, "_input_range", None)

    def _qparams_now(self, index: int) -> torch.Tensor | None:
        current = self._current_range()
        if current is None:
            return None
        return qmath.qparams(*current, self.spec.qmin, self.spec.qmax, self.spec.symmetric)[index]

    @property
    def scale(self) -> torch.Tensor | None:
        """Step size: ``x ~= (q - zero_point) * scale`` (the last forward's, before a range is set)."""
        return self._qparams_now(0)

    @property
    def zero_point(self) -> torch.Tensor | None:
        """Integer zero point (0 for symmetric specs)."""
        return self._qparams_now(1)

    # ---- forward -----------------------------------------------------------------------------------
    def _axis(self, x: torch.Tensor) -> int | None:
        axis = self.spec.axis
        if axis is None:
            return None
        if not -x.dim() <= axis < x.dim():
            raise ConfigError(f"QuantSpec.axis={axis} is out of range for a tensor of shape {tuple(x.shape)}")
        return axis % x.dim()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "disabled":
            return x
        if self.spec.dynamic:  # each forward's own range: nothing to calibrate
            return x if self.mode == "calib" else qmath.fake_quant_dynamic(x, self.spec.per_token,
                                                                            self.spec.fake_quant)
        axis = self._axis(x)
        if self.mode == "calib":
            if self.spec.amax is None:
                self.calibrator.collect(x)
            return x
        spec = self.spec
        if spec.unsigned:
            _check_unsigned(x.detach())
        if self._max is None:
            lo, hi = self._scaled(*(t.float() for t in channel_minmax(x, axis)))
            self._input_range = (lo, hi)
        else:
            lo, hi = self._min.to(x.device), self._max.to(x.device)
        if spec.symmetric:
            amax = qmath.along_axis(torch.maximum(lo.abs(), hi.abs()), x.dim(), axis)
            return qmath.fake_quant_symmetric(x, amax, spec.qmin, spec.qmax, spec.fake_quant)
        step, zero_point = qmath.affine_qparams(lo, hi, spec.qmin, spec.qmax)
        step, zero_point = qmath.along_axis(step, x.dim(), axis), qmath.along_axis(zero_point, x.dim(), axis)
        return qmath.fake_quant_affine(x, step, zero_point, spec.qmin, spec.qmax, spec.fake_quant)

    def extra_repr(self) -> str:
        spec = self.spec
        kind = "sym" if spec.symmetric else "affine"
        axis = "per-tensor" if spec.axis is None else f"axis={spec.axis}"
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        if spec.dynamic:
            return f"8-bit affine [0, 255] dynamic {'per-token' if spec.per_token else 'per-tensor'} {self.mode}"
        return f"{spec.num_bits}-bit {kind} [{spec.qmin}, {spec.qmax}] {axis} {spec.calib_method} {self.mode} {state}"


def quantizers_of(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every TensorQuantizer of ``model``, by module name (the one definition of "the model's quantizers")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}
