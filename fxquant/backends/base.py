"""A deployment backend: default specs, placement rules, pass-through kinds, the runtime it deploys to and its
export passes, declared as data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fxquant.backends.runtime import RUNTIMES
from fxquant.errors import ConfigError
from fxquant.lower.export_passes import EXPORT_PASSES
from fxquant.rules import Rule
from fxquant.rules.rule import check_rules
from fxquant.spec import QuantSpec


@dataclass(frozen=True)
class Backend:
    """Placement policy for one runtime.

    passthrough: kinds that need no quantizer of their own on this backend (the runtime fuses them or runs
    them on quantized data); they are not reported as float.
    float_reasons: kinds this backend deliberately leaves in floating point, with the reason the prepare
    report gives for each such op (a kind with neither a rule, pass-through nor reason is reported as unknown).
    runtime: where the exported graph deploys (a key of ``fxquant.backends.runtime.RUNTIMES``, which declares what
    each runtime executes: prepare refuses or warns about specs it cannot run, ops it has no dynamic kernel for
    stay float), and how export verifies it. "onnxruntime": verified as ORT deploys it (every fusion, its int8
    kernels), with the report of ops meant for int8 that ORT left in float and the int8-vs-float latency check
    (``fxquant.tune`` needs it); "tensorrt": verified for its meaning in ORT (basic optimizations) and linted
    against TensorRT's Q/DQ fusion rules (``fxquant.lower.trt_lint``); None (another runtime): verified for its
    meaning in ORT, no spec checks.
    export_passes: names of the ONNX passes export runs for this backend after the common ones, in this order
    (``fxquant.lower.export_passes.EXPORT_PASSES``: "ort_cpu_graph", "integer_float_output", "int32_bias").
    saturation_aware_weights: after calibration, weights on the default weight spec get 8 bits where no pair of
    adjacent products can overflow the int16 accumulation of x86 u8s8 kernels without VNNI, 7 bits where one
    can (``fxquant.ptq.weight_widths``); plain 8 bits everywhere for ``QuantConfig(target="vnni")``.
    bias_correction: what ``QuantConfig(bias_correction="auto")`` (the default) does on this backend: a method
    that costs no pass of its own ("input_means", where calibrate's ranges pass can tap the layer inputs), or
    None (no correction), chosen by measurement (docs/ptq.md).
    """

    name: str
    description: str
    weight: QuantSpec
    activation: QuantSpec
    rules: tuple[Rule, ...]
    passthrough: frozenset[str]
    float_reasons: Mapping[str, str] = field(default_factory=dict)
    runtime: str | None = None
    export_passes: tuple[str, ...] = ()
    saturation_aware_weights: bool = False
    bias_correction: str | None = None

    def __post_init__(self) -> None:
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ConfigError(f"Backend.runtime must be one of {tuple(RUNTIMES)} or None (another runtime), got "
                              f"{self.runtime!r}")
        if isinstance(self.export_passes, str) or not isinstance(self.export_passes, tuple):
            raise ConfigError(f"Backend.export_passes must be a tuple of pass names, got {self.export_passes!r}")
        unknown = [name for name in self.export_passes if name not in EXPORT_PASSES]
        if unknown:
            raise ConfigError(f"Backend.export_passes names unknown pass(es) {unknown}; valid: {sorted(EXPORT_PASSES)}")

    @property
    def verify_level(self) -> str:
        """The ONNX Runtime optimization level export verifies with: "all" (as deployed, fused int8 kernels) for
        the onnxruntime runtime, "basic" (the meaning of the ONNX ops) for a graph meant for another runtime."""
        return "all" if self.runtime == "onnxruntime" else "basic"

    def with_rules(self, *rules: Rule) -> Backend:
        """This backend plus ``rules``. Rules run by descending priority (the built-in ones use 30 for fused
        pairs such as conv -> relu, 20 for single ops, 10 for scale-sharing ops); at equal priority the added
        rules run first. A node taken by one rule is not matched by later ones. Names must not clash with the
        backend's (drop a built-in rule with ``without_rules`` to replace it)."""
        rules = check_rules(rules, "with_rules()")
        clash = sorted({r.name for r in rules} & {r.name for r in self.rules})
        if clash:
            raise ConfigError(f"rule name(s) {clash} already belong to the {self.name} backend; rename yours, or "
                              f"replace the built-in one: backend.without_rules({', '.join(map(repr, clash))})"
                              f".with_rules(...)")
        return replace(self, rules=(*rules, *self.rules))

    def without_rules(self, *names: str) -> Backend:
        """This backend without the named built-in rules."""
        known = [r.name for r in self.rules]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"the {self.name} backend has no rule(s) {unknown}; its rules: {known}")
        return replace(self, rules=tuple(r for r in self.rules if r.name not in names))
