"""Checks shared by the backends' rules; each returns None to accept or the reason to decline."""

from __future__ import annotations

from fxquant.ops.kinds import parameter_arg
from fxquant.ops.quant_modules import has_quant_form
from fxquant.provenance import read
from fxquant.rules import Match
from fxquant.rules.context import RuleContext
from fxquant.rules.rule import Check


def quantizable_weight(name: str) -> Check:
    """The weighted op has a weight fxquant can quantize (a known module type or a constant argument)."""

    def check(match: Match, ctx: RuleContext) -> str | None:
        node = match[name]
        if node.op == "call_module":
            module = ctx.view.modules[node.target]
            if not has_quant_form(module):
                return f"`{node.target}` is a {type(module).__name__}, a subclass with no quantized form"
            return None
        if parameter_arg(ctx.view.gm, node) is None:
            return f"`{node.name}` takes its weight from a computed tensor, not a parameter"
        return None

    return check


def two_activation_inputs(name: str) -> Check:
    """The op combines two activation tensors (not an activation and a constant)."""

    def check(match: Match, ctx: RuleContext) -> str | None:
        n = len(ctx.activation_inputs(match[name]))
        return None if n == 2 else f"`{match[name].name}` combines {n} activation tensor(s) with constants"

    return check


# Ops that hand a quantized value on unchanged in meaning (the runtime keeps it in int8 or shares its scale):
# whether an add's output is consumed in int8 is decided past them.
_CARRY = frozenset({"relu", "relu6", "hardtanh", "identity", "reshape", "permute", "max_pool", "cat"})
# Ops whose own quantization is decided by this same check: they consume in int8 when they are quantized.
_ELEMENTWISE = frozenset({"add", "mul"})


def _float_consumer(view, backend, user) -> str | None:
    """The reason ``user`` reads its input in floating point, or None."""
    kind = view.kinds[user]
    if read(user).pad_merged_into:
        return None  # export_onnx merges it into the convolutions it feeds
    if kind in backend.float_reasons and kind not in _CARRY and kind not in _ELEMENTWISE:
        return f"{kind} `{user.name}`"
    return None


def int8_consumers(view, backend) -> dict:
    """For every node: None when its output reaches an op that reads it in int8, else the float consumers
    it reaches (walking through pass-through ops and adds/muls that reach no int8 consumer themselves).
    The model output decides nothing: a backbone's output may feed int8 layers in another engine, so an op
    whose output only leaves the model is placed as it would be inside a network.
    Computed once per graph and backend, in reverse graph order (linear in graph size)."""
    cache = view.__dict__.setdefault("_int8_consumers", {})
    if backend.name in cache:
        return cache[backend.name]
    result: dict = {}
    carry = _CARRY | backend.passthrough
    for node in reversed(list(view.kinds)):
        floats: list[str] = []
        for user in node.users:
            if user.op == "output" or user.meta.get("tensor_meta") is None:
                continue  # the model output decides nothing (above); shape queries (x.shape) read no values
            kind = view.kinds.get(user)
            reason = _float_consumer(view, backend, user)
            if reason is not None:
                floats.append(reason)
            elif kind in carry or kind in _ELEMENTWISE or read(user).pad_merged_into:
                if result.get(user) is None:
                    break
                floats.extend(r for r in result[user] if r not in floats)
            else:
                break  # a quantized consumer
        else:
            result[node] = floats[:3] or None  # three name the case in a report; memory stays linear
            continue
        result[node] = None
    cache[backend.name] = result
    return result


def output_reaches_int8(name: str) -> Check:
    """Decline an add/mul whose output only reaches ops that run in floating point (LayerNorm, GELU), directly
    or through pass-through ops and adds in the same position: quantizing it feeds no int8 kernel and only adds
    rounding error. This is the residual stream of a pre-norm transformer; a ResNet's adds feed the next
    convolution and stay quantized."""

    def check(match: Match, ctx: RuleContext) -> str | None:
        node = match[name]
        floats = int8_consumers(ctx.view, ctx.backend).get(node)
        if floats is None:
            return None
        return (f"`{node.name}` feeds only ops that run in floating point ({', '.join(floats)}), directly or "
                "through other such adds: quantizing it would add rounding error and enable no int8 kernel")

    return check


STEM_KINDS = frozenset({"pad"})  # what may sit between a model input and a stem conv (zero pads, merged or not)


def float_stem(name: str, max_reduction: int | None, min_positions: int = 0) -> Check:
    """A Conv2d that reads a model input (through zero pads) stays float: where ``QuantConfig(float_stem=True)``
    asks, or by the backend's choice (``float_stem=None``) where its reduction (input channels per group x kernel
    area) is at most ``max_reduction`` (None: never by choice) and its output map in the example has at least
    ``min_positions`` positions per image. ``float_stem=False`` quantizes every stem."""

    def check(match: Match, ctx: RuleContext) -> str | None:
        node, choice = match[name], ctx.config.float_stem
        if choice is False or (choice is None and max_reduction is None) or ctx.kind(node) != "conv":
            return None
        weight = _weight(ctx, node)
        if weight is None or weight.dim() != 4 or not _reads_model_input(ctx, node):
            return None
        reduction = weight[0].numel()
        if choice:
            return "a stem conv (reads the model input): QuantConfig(float_stem=True) keeps it float"
        if reduction > max_reduction or _positions(node) < min_positions:
            return None
        return (f"a stem conv (reads the model input, {reduction} products per output, at most {max_reduction}): "
                f"{ctx.backend.name} runs it faster in float (no QuantizeLinear of the input, and int8 kernels do "
                "not pay on so short a reduction) and 8-bit input quantization is where such stems lose most "
                "(EfficientNet-Lite0: 22.5 dB vs 16.1 dB, docs/ptq.md); QuantConfig(float_stem=False) quantizes it")

    return check


def _positions(node) -> int:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[-1] * shape[-2]) if shape is not None and len(shape) == 4 else 0


def _weight(ctx: RuleContext, node):
    if node.op == "call_module":
        return getattr(ctx.view.modules[node.target], "weight", None)
    attr = parameter_arg(ctx.view.gm, node)
    if attr is None:
        return None
    value = ctx.view.gm
    for part in attr.target.split("."):
        value = getattr(value, part)
    return value


def _reads_model_input(ctx: RuleContext, node) -> bool:
    inputs = ctx.activation_inputs(node)
    source = inputs[0] if inputs else None
    while source is not None and source.op != "placeholder":
        if ctx.kind(source) not in STEM_KINDS and not read(source).pad_merged_into:
            return False
        source = source.args[0] if source.args and hasattr(source.args[0], "op") else None
    return source is not None
