"""QuantSpec (how one tensor is quantized) and QuantConfig (what a prepare run does).

Both are frozen, validated dataclasses: a bad field raises a ValueError/TypeError that names the field and
says what is accepted. The field names of QuantSpec follow NVIDIA pytorch_quantization's QuantDescriptor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fxquant.errors import ConfigError, ConfigTypeError
from fxquant.qmath import qrange

HISTOGRAM_METHODS = frozenset({"percentile", "entropy", "mse"})
"""Calibration methods that derive a range from one histogram per tensor (one calibrator serves them all)."""
CALIB_METHODS = ("max", "ema", *sorted(HISTOGRAM_METHODS))
"""Every ``QuantSpec.calib_method`` name; ``fxquant.calib.CALIBRATORS`` maps each to its calibrator."""
CPU_TARGETS = {
    "vnni": "x86 CPUs whose int8 dot products accumulate exactly in int32 (AVX-VNNI, AVX-512 VNNI, AMX)",
    "avx2": "x86 CPUs without VNNI (AVX2, AVX-512 without VNNI): ORT adds adjacent u8s8 products in saturating int16",
}
"""The CPU targets of ONNX Runtime's int8 kernels (``QuantConfig.target``, ``fxquant.convert(exact=...)``): they
compute differently on each (``fxquant.lower.ort.targets``)."""


def check_cpu_target(target: object, what: str = "target") -> str:
    """``target`` if it names a CPU target; ConfigError listing them otherwise."""
    if not isinstance(target, str) or target not in CPU_TARGETS:
        raise ConfigError(f"unknown CPU {what} {target!r}; valid targets: " +
                          "; ".join(f"{name!r} ({what_it_is})" for name, what_it_is in CPU_TARGETS.items()))
    return target


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"QuantSpec.{name} must be True or False, got {value!r} ({type(value).__name__})")


def _check_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{owner}.{name} must be an int, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        num_bits: bit width, 2..16.
        axis: None for one scale per tensor, or the axis that gets one scale per channel. For weights of
            weighted layers the backend resolves it to the output-channel axis (0 for Conv/Linear, 1 for
            ConvTranspose); any non-None value there means "per output channel".
        amax: a fixed range; a quantizer with a fixed amax is not calibrated.
        unsigned: symmetric range [0, 2^b - 1] instead of [-(2^(b-1) - 1), 2^(b-1) - 1].
        narrow_range: symmetric signed range without its lowest code (-127..127 at 8 bits).
        fake_quant: output dequantized floats (True) or integer codes (False).
        learn_amax: train the range during quantization-aware training (``fxquant.prepare_qat``; LSQ).
        scale_amax: multiply the calibrated amax by this factor.
        calib_method: calibrator name, one of ``CALIB_METHODS`` (max, ema, entropy, mse, percentile).
        symmetric: False gives affine quantization with a zero point over [0, 2^b - 1].
        percentile: for ``calib_method="percentile"``, the share of |x| (or, for affine specs, of each tail)
            kept inside the range, in (0, 100].
        ema_decay: for ``calib_method="ema"``, the decay of the moving averages, in (0, 1).
        dynamic: the range is computed from each forward's own data (no calibration), uint8 affine as ONNX
            DynamicQuantizeLinear; needs ``num_bits=8, symmetric=False`` and no axis/amax/learned range.
        per_token: with ``dynamic``, one range per row (every position of all but the last axis: per token in a
            transformer) instead of one per tensor. Fake quant only: ONNX has no per-row DynamicQuantizeLinear.
        hist_samples: for the histogram methods, the most elements of one tensor read per batch: a larger
            tensor's histogram, min and max come from a fixed, evenly spread subsample (runs of contiguous
            elements, see ``fxquant.calib.histogram``); None reads every element (slower calibration).
    """

    num_bits: int = 8
    axis: int | None = None
    amax: float | None = None
    unsigned: bool = False
    narrow_range: bool = False
    fake_quant: bool = True
    learn_amax: bool = False
    scale_amax: float | None = None
    calib_method: str = "max"
    symmetric: bool = True
    percentile: float = 99.99
    ema_decay: float = 0.9
    dynamic: bool = False
    per_token: bool = False
    hist_samples: int | None = 1 << 18

    def __post_init__(self) -> None:
        _check_int("QuantSpec", "num_bits", self.num_bits)
        if not 2 <= self.num_bits <= 16:
            raise ConfigError(f"QuantSpec.num_bits must be between 2 and 16, got {self.num_bits}")
        if self.axis is not None:
            _check_int("QuantSpec", "axis", self.axis)
        for name in ("unsigned", "narrow_range", "fake_quant", "learn_amax", "symmetric", "dynamic", "per_token"):
            _check_bool(name, getattr(self, name))
        if self.amax is not None:
            if isinstance(self.amax, bool) or not isinstance(self.amax, (int, float)):
                raise ConfigTypeError(f"QuantSpec.amax must be a number or None, got {self.amax!r}")
            if not math.isfinite(self.amax) or self.amax < 0:
                raise ConfigError(f"QuantSpec.amax must be a finite number >= 0, got {self.amax}")
            if not self.symmetric:
                raise ConfigError("QuantSpec.amax fixes a symmetric range; with symmetric=False leave amax=None "
                                  "and let calibration find min and max")
        if self.scale_amax is not None:
            if isinstance(self.scale_amax, bool) or not isinstance(self.scale_amax, (int, float)):
                raise ConfigTypeError(f"QuantSpec.scale_amax must be a number or None, got {self.scale_amax!r}")
            if not math.isfinite(self.scale_amax) or self.scale_amax <= 0:
                raise ConfigError(f"QuantSpec.scale_amax must be a finite number > 0, got {self.scale_amax}")
        if not isinstance(self.calib_method, str) or self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"QuantSpec.calib_method={self.calib_method!r} is unknown; "
                              f"valid methods: {sorted(CALIB_METHODS)}")
        for name, ok, rule in (("percentile", lambda v: 0 < v <= 100, "in (0, 100], e.g. 99.99"),
                               ("ema_decay", lambda v: 0 < v < 1, "in (0, 1), e.g. 0.9")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigTypeError(f"QuantSpec.{name} must be a number {rule}, got {value!r}")
            if not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"QuantSpec.{name} must be {rule}, got {value}")
        if self.hist_samples is not None:
            _check_int("QuantSpec", "hist_samples", self.hist_samples)
            if self.hist_samples < 4096:
                raise ConfigError(f"QuantSpec.hist_samples must be >= 4096 (or None: bin every element), got "
                                  f"{self.hist_samples}")
        if self.calib_method in HISTOGRAM_METHODS and self.axis is not None:
            raise ConfigError(f"calib_method={self.calib_method!r} collects one histogram per tensor; per-channel "
                              "specs (axis set) use calib_method='max' or 'ema'")
        if self.narrow_range and not self.symmetric:
            raise ConfigError("QuantSpec.narrow_range applies to symmetric quantization; "
                              "drop it or set symmetric=True")
        if self.learn_amax and not self.symmetric and self.axis is not None:
            raise ConfigError("QuantSpec.learn_amax=True with symmetric=False learns one (min, max) pair per tensor; "
                              "per-channel affine ranges would learn a zero point per channel, which neither backend "
                              "runs (ORT and TensorRT take one activation zero point per tensor): set axis=None, or "
                              "symmetric=True for per-channel learned ranges")

        self._check_dynamic()

    def _check_dynamic(self) -> None:
        if self.per_token and not self.dynamic:
            raise ConfigError("QuantSpec.per_token=True is a kind of dynamic range: set dynamic=True too")
        if not self.dynamic:
            return
        wrong = [f"{name}={getattr(self, name)!r}" for name, ok in (
            ("num_bits", self.num_bits == 8), ("symmetric", not self.symmetric), ("axis", self.axis is None),
            ("amax", self.amax is None), ("learn_amax", not self.learn_amax), ("scale_amax", self.scale_amax is None),
            ("unsigned", not self.unsigned)) if not ok]
        if wrong:
            raise ConfigError(f"QuantSpec.dynamic=True is uint8 affine with the range of each forward's data (ONNX "
                             f"DynamicQuantizeLinear), which {', '.join(wrong)} contradicts: use "
                             "QuantSpec(dynamic=True, symmetric=False) (add per_token=True for one range per row)")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return qrange(self.num_bits, self.unsigned, self.narrow_range, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return qrange(self.num_bits, self.unsigned, self.narrow_range, self.symmetric)[1]

    def with_(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


BIAS_CORRECTION_METHODS = ("empirical", "analytical", "input_means")


@dataclass(frozen=True)
class AdaRoundOptions:
    """Reconstruction settings: AdaRound's learned rounding (Nagel et al. 2020) fitted block by block (BRECQ, Li et
    al. 2021) with activation quantization in the loop, dropped at random (QDrop, Wei et al. 2022).

    The defaults were chosen by measurement on the pretrained EfficientNet-Lite0 (64 calibration crops, 2 cores;
    docs/ptq.md): 100 steps of 16 samples on 16 x 16 windows per block take minutes where the papers' 1000+
    steps of 64 whole maps take hours on a CPU, for most of the gain.

    Args:
        iterations: Adam steps per block.
        batch_size: samples per step.
        num_samples: most calibration samples used (read once from the batches; memory: two copies of the
            tensors crossing one block boundary for this many samples).
        lr: Adam learning rate of the rounding variables.
        reg_weight: lambda, weight of the regularizer that pushes each rounding to 0 or 1.
        beta_start, beta_end: the regularizer's exponent, annealed linearly after the warm-up.
        warm_up: share of the iterations without the regularizer.
        granularity: "block" (the residual units and the stretches between them) or "layer" (one layer at a
            time, AdaRound's objective).
        act_drop: probability that an activation stays float per element in a step (the block's input and each
            activation quantizer inside it): 0.5 is QDrop's, 0 quantizes them always (BRECQ), 1 never.
        act_lr: Adam learning rate of the log of each activation quantizer's step inside a block (LSQ's step,
            learned with the rounding as QDrop does); 0 keeps the calibrated activation ranges.
        crop: train on random ``crop`` x ``crop`` windows of a block's input feature maps where they are larger
            (the float block recomputes the target on the same window); None trains on whole maps.
        seed: seeds the sampling of steps, so a run is reproducible.
    """

    iterations: int = 100
    batch_size: int = 16
    num_samples: int = 1024
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_up: float = 0.2
    granularity: str = "block"
    act_drop: float = 0.5
    act_lr: float = 0.0
    crop: int | None = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "num_samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ConfigError(f"AdaRoundOptions.{name} must be a positive int, got {value!r}")
        for name in ("lr", "reg_weight", "beta_start", "beta_end", "warm_up", "act_drop", "act_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"AdaRoundOptions.{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.warm_up < 1:
            raise ConfigError(f"AdaRoundOptions.warm_up must be in [0, 1), got {self.warm_up}")
        if self.act_drop > 1:
            raise ConfigError(f"AdaRoundOptions.act_drop is a probability in [0, 1], got {self.act_drop}")
        if self.lr == 0:
            raise ConfigError("AdaRoundOptions.lr must be > 0")
        if self.crop is not None and (isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 1):
            raise ConfigError(f"AdaRoundOptions.crop must be a positive int or None, got {self.crop!r}")
        if self.granularity not in ("block", "layer"):
            raise ConfigError(f"AdaRoundOptions.granularity must be 'block' or 'layer', got {self.granularity!r}")


@dataclass(frozen=True)
class Override:
    """Per-module settings, matched by a glob on the module's qualified name or its class name.

    ``exclude=True`` keeps the matching ops in float (reported in the prepare summary); ``weight`` and
    ``activation`` replace the specs the backend would use for the matching ops.
    """

    pattern: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    exclude: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigTypeError(f"Override.pattern must be a non-empty glob string, got {self.pattern!r}")
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantSpec):
                raise ConfigTypeError(f"Override.{name} must be a QuantSpec or None, got {type(value).__name__}")


@dataclass(frozen=True)
class QuantConfig:
    """Settings for one prepare run.

    Args:
        weight: replaces the backend's default weight spec (None keeps it).
        activation: replaces the backend's default activation spec (None keeps it).
        overrides: per-module specs and exclusions; later entries win.
        leaf_modules: globs on module names or class names that tracing keeps whole (their insides stay
            float and are reported).
        non_traceable: globs on module names or class names that run eagerly (not traced); the modules they
            call are traced or, for Conv/Linear layers, quantized by module swap. Modules torch.fx fails on are
            found automatically; this names them up front (or marks code that traces but must not be).
        concrete_args: values fixed for the root forward's arguments while tracing (``torch.fx``'s
            ``concrete_args``), e.g. ``{"output_attentions": False}``. Arguments the example inputs leave out
            that have non-tensor defaults are fixed at their defaults anyway.
        fold_bn: fold BatchNorm into the preceding Conv/Linear.
        strict: raise instead of warning when a pass must skip something.
        equalize: cross-layer equalization in prepare, after BN folding (``fxquant.ptq.equalize``).
        equalize_relu6: with ``equalize``, also equalize through ReLU6 / Hardtanh(0, m) by turning them into ReLU
            (the DFQ paper's recipe for MobileNetV2); changes the float function where activations exceed the
            clip, measured on the example inputs and reported (``report_of(m).ptq['equalize']``). None (default):
            for per-tensor weights (where equalization pays) when the float output on the example inputs keeps
            an SQNR of at least 30 dB (``fxquant.ptq.relu6``); off for per-channel weights.
        absorb_bias: high-bias absorption in prepare, after equalization (``fxquant.ptq.bias_absorption``).
        bias_correction: "auto" (default: ``Backend.bias_correction``, input means on ``onnxruntime``, where
            free: ``fxquant.ptq.bias_correction``), False, True / "empirical" (a forward per layer), "input_means"
            (channel means of calibrate's ranges pass) or "analytical" (BatchNorm statistics); ``correct_bias``.
        float_stem: None (default: the backend's choice; ``onnxruntime`` keeps 3 x 3 x 3 image stems float,
            ``fxquant.backends.checks.float_stem``), True (every stem float) or False (every stem int8).
        adaround: False, True or an ``AdaRoundOptions``: calibrate() learns the weight rounding on its
            batches (``fxquant.adaround``).
        smoothquant: "auto" (default), True or False: calibrate() first migrates activation outliers of every
            LayerNorm that feeds Linears into their weights, with the strength searched per LayerNorm on its
            batches (``fxquant.ptq.smoothquant``; float-exact). "auto" reports it only where it smoothed
            something; True always reports it.
        outlier_channels: "auto" (default), True or False: calibrate() then runs the few input channels of a
            Linear whose calibration maximum dwarfs the rest (transformers' "massive activations") in float beside
            the int8 Linear, where that divides the output error on its batches by at least 2
            (``fxquant.ptq.outlier_channels``; float-exact). "auto" reports it only where it split something.
        gptq: calibrate() rounds the weights of Linear and Conv2d layers (up to 1152 weights per output
            channel) with GPTQ, on the layer inputs of its ranges pass, instead of to nearest
            (``fxquant.ptq.gptq``: same steps, other codes, fixed afterwards; a few seconds). Not with
            ``adaround``, which learns the rounding itself.
        target: the CPU ONNX Runtime will run the model on (ORT backends only; its int8 kernels compute
            differently per CPU): "vnni" (AVX-VNNI, AVX-512 VNNI, AMX: exact int32 sums) gives every layer plain
            8-bit weights; "avx2" (x86 without VNNI: adjacent u8 x s8 products added in a saturating int16) and
            None (not declared: safe on both) give saturation-aware weights (``fxquant.ptq.weight_widths``).
            Recorded in the encodings and the ONNX metadata. Never guessed from the machine that quantizes.
    """

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    overrides: tuple[Override, ...] = ()
    leaf_modules: tuple[str, ...] = ()
    non_traceable: tuple[str, ...] = ()
    concrete_args: tuple[tuple[str, object], ...] = ()
    fold_bn: bool = True
    strict: bool = False
    equalize: bool = False
    equalize_relu6: bool | None = None
    absorb_bias: bool = False
    bias_correction: bool | str = "auto"
    float_stem: bool | None = None
    adaround: bool | AdaRoundOptions = False
    smoothquant: bool | str = "auto"
    outlier_channels: bool | str = "auto"
    gptq: bool = False
    target: str | None = None

    def __post_init__(self) -> None:
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantSpec):
                raise ConfigTypeError(f"QuantConfig.{name} must be a QuantSpec or None, got {type(value).__name__}")
        if isinstance(self.overrides, Override) or not isinstance(self.overrides, (tuple, list)):
            raise ConfigTypeError("QuantConfig.overrides must be a tuple of Override(...)")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for item in self.overrides:
            if not isinstance(item, Override):
                raise ConfigTypeError(f"QuantConfig.overrides holds {type(item).__name__}; use Override(pattern, ...)")
        if isinstance(self.leaf_modules, str) or not isinstance(self.leaf_modules, (tuple, list)):
            raise ConfigTypeError("QuantConfig.leaf_modules must be a tuple of globs, e.g. ('encoder.*', 'MyBlock')")
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if isinstance(self.non_traceable, str) or not isinstance(self.non_traceable, (tuple, list)):
            raise ConfigTypeError("QuantConfig.non_traceable must be a tuple of globs, e.g. ('detect', 'MyAttention')")
        object.__setattr__(self, "non_traceable", tuple(self.non_traceable))
        for field_name in ("leaf_modules", "non_traceable"):
            for glob in getattr(self, field_name):
                if not isinstance(glob, str) or not glob:
                    raise ConfigTypeError(f"QuantConfig.{field_name} holds {glob!r}; use non-empty glob strings")
        object.__setattr__(self, "concrete_args", _pairs(self.concrete_args))
        for name in ("fold_bn", "strict", "equalize", "absorb_bias", "gptq"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(f"QuantConfig.{name} must be True or False")
        if self.float_stem is not None and not isinstance(self.float_stem, bool):
            raise ConfigTypeError("QuantConfig.float_stem must be None (the backend's choice), True or False")
        if self.equalize_relu6 is not None and not isinstance(self.equalize_relu6, bool):
            raise ConfigTypeError("QuantConfig.equalize_relu6 must be True, False or None (per-tensor weights decide)")
        if not (isinstance(self.bias_correction, bool) or self.bias_correction in ("auto", *BIAS_CORRECTION_METHODS)):
            raise ConfigError(f"QuantConfig.bias_correction must be 'auto' (the backend's choice), False, True (= "
                              f"'empirical') or one of {list(BIAS_CORRECTION_METHODS)}, got {self.bias_correction!r}")
        for name in ("smoothquant", "outlier_channels"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or value == "auto"):
                raise ConfigError(f"QuantConfig.{name} must be 'auto', True or False, got {value!r}")
        if not isinstance(self.adaround, (bool, AdaRoundOptions)):
            raise ConfigTypeError(f"QuantConfig.adaround must be True, False or an AdaRoundOptions, "
                                  f"got {type(self.adaround).__name__}")
        if self.gptq and self.adaround:
            raise ConfigError("QuantConfig(gptq=True) and adaround both choose the weight rounding: keep one "
                              "(adaround learns it on the calibration batches, slower and usually better)")
        if self.target is not None:
            check_cpu_target(self.target, "target (QuantConfig.target)")
        if (self.equalize or self.absorb_bias or self.bias_correction == "analytical") and not self.fold_bn:
            raise ConfigError("equalize, absorb_bias and analytical bias correction work on folded BatchNorm; "
                              "keep fold_bn=True")

    @property
    def bias_correction_method(self) -> str | None:
        """"empirical", "analytical", "input_means", "auto" (the backend decides at calibrate) or None."""
        if self.bias_correction is True:
            return "empirical"
        return self.bias_correction or None

    @property
    def adaround_options(self) -> AdaRoundOptions | None:
        """The AdaRound options in effect, or None when AdaRound is off."""
        if self.adaround is True:
            return AdaRoundOptions()
        return self.adaround or None


def _pairs(value: object) -> tuple[tuple[str, object], ...]:
    """concrete_args as (name, value) pairs: a dict at the boundary, a tuple inside the frozen config."""
    if isinstance(value, dict):
        value = tuple(value.items())
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
        raise ConfigTypeError("QuantConfig.concrete_args must be a dict of forward argument names to values, "
                              "e.g. {'output_attentions': False}")
    return tuple(value)
