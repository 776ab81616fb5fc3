"""The runtimes a backend deploys to (``Backend.runtime`` names one of ``RUNTIMES``) and what each can execute,
declared as data, with the check of a config against it.

A QuantConfig can ask for specs the deployment runtime cannot run: TensorRT's explicit quantization takes
symmetric int8 Q/DQ only (zero point 0, signed) and has no DynamicQuantizeLinear; ONNX Runtime feeds
DynamicQuantizeLinear into integer matmuls only (MatMulInteger), so a dynamically quantized convolution would run
in float between a quantize and a dequantize. ``check_specs`` raises for what cannot work at all (dynamic
activations on a runtime without them) and returns a warning for specs the runtime refuses or runs otherwise
(the fake-quant model still simulates them, e.g. for research on other widths). Annotate reads
``Runtime.dynamic_kinds`` to keep ops with no dynamic kernel float, with the reason. How export verifies a graph
for each runtime is ``Backend.verify_level`` and ``fxquant.lower.onnx_export``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.errors import ConfigError
from fxquant.spec import QuantConfig, QuantSpec


@dataclass(frozen=True)
class Runtime:
    """``label``: its name in messages; ``max_bits``: the widest Q/DQ it runs (narrower specs are written as 8-bit
    Q/DQ with fewer codes); ``affine``: zero points other than 0; ``unsigned``: unsigned codes; ``dynamic_kinds``:
    the op kinds it runs from DynamicQuantizeLinear in integer kernels (empty: none)."""

    label: str
    max_bits: int
    affine: bool
    unsigned: bool
    dynamic_kinds: frozenset[str]
    fix: str  # what to do instead, in the messages


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("ONNX Runtime", 16, affine=True, unsigned=True, dynamic_kinds=frozenset({"linear"}),
                           fix="give those ops a static activation spec (Override(..., activation=QuantSpec(...)))"),
    "tensorrt": Runtime("TensorRT", 8, affine=False, unsigned=False, dynamic_kinds=frozenset(),
                        fix="use symmetric signed 8-bit specs (QuantSpec(num_bits=8), the default), or "
                            "backend='onnxruntime' for uint8 affine activations"),
}


def _problems(spec: QuantSpec, runtime: Runtime) -> list[str]:
    found = []
    if not spec.symmetric and not runtime.affine:
        found.append("affine (symmetric=False): a QuantizeLinear with a zero point other than 0")
    if spec.unsigned and not runtime.unsigned:
        found.append("unsigned=True: uint8 codes")
    if spec.num_bits > runtime.max_bits:
        found.append(f"num_bits={spec.num_bits}: {spec.num_bits}-bit Q/DQ")
    return found


def check_specs(runtime_name: str | None, backend: str, config: QuantConfig, defaults: dict[str, QuantSpec]
                ) -> list[str]:
    """ConfigError for dynamic activations where the runtime runs none; one warning line per spec in force (the
    config's, its overrides', the backend's defaults) that the runtime refuses or runs otherwise."""
    runtime = RUNTIMES.get(runtime_name)
    if runtime is None:
        return []
    specs = [(role, getattr(config, role) or defaults[role], "") for role in ("weight", "activation")]
    specs += [(role, getattr(ov, role), f" of Override({ov.pattern!r})") for ov in config.overrides
              for role in ("weight", "activation") if getattr(ov, role) is not None]
    if not runtime.dynamic_kinds and any(spec.dynamic for _, spec, _ in specs):
        raise ConfigError(f"the {backend} backend targets {runtime.label}, which cannot run dynamic activations "
                          "(QuantSpec(dynamic=True) exports DynamicQuantizeLinear, which it has no kernel for): use "
                          "a static activation spec (calibrated ranges), or backend='onnxruntime_dynamic' for ONNX "
                          "Runtime")
    lines = []
    for role, spec, where in specs:
        for problem in _problems(spec, runtime):
            lines.append(f"the {role} spec{where} is {problem}, which {runtime.label} does not run")
    if lines:
        lines.append(f"the fake-quant model simulates these specs, but {runtime.label} will refuse or change the "
                     f"exported model: {runtime.fix}")
    return lines


def dynamic_decline(spec: QuantSpec, kind: str, runtime_name: str | None) -> str | None:
    """Why an op of ``kind`` reading a dynamically quantized input stays float on the named runtime, or None."""
    runtime = RUNTIMES.get(runtime_name)
    if runtime is None or not spec.dynamic or kind in runtime.dynamic_kinds:
        return None
    return (f"{runtime.label} runs dynamic activations (QuantSpec(dynamic=True), DynamicQuantizeLinear) only into "
            f"{'/'.join(sorted(runtime.dynamic_kinds))} layers (integer matmuls); a {kind} would run in float "
            f"between a quantize and a dequantize, so it stays float: {runtime.fix}")
