"""A deployment backend: default specs, placement rules and pass-through kinds, declared as data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fxquant.errors import ConfigError
from fxquant.rules import Rule
from fxquant.rules.rule import check_rules
from fxquant.spec import QuantSpec

VERIFY_LEVELS = ("all", "basic")


@dataclass(frozen=True)
class Backend:
    """Placement policy for one runtime.

    passthrough: kinds that need no quantizer of their own on this backend (the runtime fuses them or runs
    them on quantized data); they are not reported as float.
    float_reasons: kinds this backend deliberately leaves in floating point, with the reason the prepare
    report gives for each such op (a kind with neither a rule, pass-through nor reason is reported as unknown).
    int32_bias: export writes the bias of each quantized Conv/Gemm as int32 codes (scale s_x * s_w) read by a
    DequantizeLinear, as ONNX Runtime needs to fuse QLinearConv/QGemm; TensorRT takes float biases.
    verify_level: the ONNX Runtime optimization level export verifies with: "all" runs the model as ORT deploys
    it (fused int8 kernels); "basic" checks the meaning of a graph meant for another runtime.
    saturation_aware_weights: after calibration, weights on the default weight spec get 8 bits where no pair of
    adjacent products can overflow the int16 accumulation of x86 u8s8 kernels without VNNI, 7 bits where one
    can (``fxquant.ptq.weight_widths``); plain 8 bits everywhere for ``QuantConfig(target="vnni")``.
    trt_fusion_lint: export lints the QDQ graph against TensorRT's Q/DQ fusion rules and warns about what TensorRT
    would run in higher precision (``fxquant.lower.trt_lint``).
    ort_cpu_graph: export writes float ops in the forms ONNX Runtime's CPU kernels run fastest, same values
    (GELU in the order ORT fuses, residual adds before LayerNorm as Sum: ``fxquant.lower.ort.cpu_graph``; float
    attention blocks as ORT's MultiHeadAttention: ``fxquant.lower.ort.attention``).
    integer_float_output: export writes a Linear with a quantized input and weight but a float output as ORT's
    MatMulIntegerToFloat (``fxquant.lower.ort.static_matmul``), which ORT would otherwise run in float.
    """

    name: str
    description: str
    weight: QuantSpec
    activation: QuantSpec
    rules: tuple[Rule, ...]
    passthrough: frozenset[str]
    float_reasons: Mapping[str, str] = field(default_factory=dict)
    int32_bias: bool = False
    verify_level: str = "basic"
    saturation_aware_weights: bool = False
    trt_fusion_lint: bool = False
    ort_cpu_graph: bool = False
    integer_float_output: bool = False

    def __post_init__(self) -> None:
        if self.verify_level not in VERIFY_LEVELS:
            raise ConfigError(f"Backend.verify_level must be one of {VERIFY_LEVELS}, got {self.verify_level!r}")

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
