"""TensorRT explicit quantization (Q/DQ) placement.

- Symmetric int8; weights per output channel (narrow range), activations per tensor.
- Targets the inputs of weighted ops (Conv, ConvTranspose, Linear, MatMul); never their outputs.
- Residual adds: quantize the skip input only, so TensorRT fuses Conv + Add (+ReLU) on the other input
  (NVIDIA/TensorRT#1992); adds that are not residuals get no quantizer, nor do residual adds whose output only
  reaches ops TensorRT runs in fp32/fp16 (the LayerNorms on a pre-norm transformer's residual stream): no
  int8 output to fuse into, only rounding added.
- Concat: all quantizers on its inputs and output share one scale. ReLU, pooling, reshapes, permutes,
  slicing and eval-mode stochastic depth pass through (TensorRT propagates Q/DQ across them).
- Attention: both inputs of a MatMul (Q @ K^T, softmax @ V) are quantized, as for any weighted op.
- Pointwise math (SiLU, Hardswish, Hardsigmoid, GELU, sigmoid, tanh, elementwise mul by an SE gate or a layer
  scale), LayerNorm and Softmax stay in fp32/fp16 on purpose: TensorRT fuses pointwise ops into the producing
  layer's epilogue and has no int8 normalization or softmax kernel; the next weighted op's input quantizer
  requantizes their output (TensorRT's Q/DQ placement guidance: quantize the inputs of weighted ops only).
"""

from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.checks import float_stem, output_reaches_int8, quantizable_weight
from fxquant.ops.kinds import WEIGHTED_KINDS
from fxquant.provenance import info
from fxquant.rules import Match, Pattern, Rule, Targets
from fxquant.rules.context import RuleContext
from fxquant.rules.residual import skip_input
from fxquant.spec import QuantSpec


def residual_add(match: Match, ctx: RuleContext) -> str | None:
    """Targets the skip input of a residual add; decline (add stays float) otherwise."""
    add = match["add"]
    inputs = ctx.activation_inputs(add)
    if len(inputs) != 2:
        return "adds a constant (TensorRT folds it into the producer); no quantizer needed"
    skip, why = skip_input(ctx.view, *inputs)
    if skip is None:
        return why
    ctx.request_input(add, skip, "residual_add")
    info(add).residual = why
    return None


def concat_shared_scale(match: Match, ctx: RuleContext) -> str | None:
    """Every quantizer on a concat's inputs or output shares one scale, so TensorRT concatenates in int8."""
    cat = match["cat"]
    ctx.share_values([*ctx.activation_inputs(cat), cat])
    return None


_POINTWISE = ("TensorRT fuses pointwise activations into the producing layer's epilogue and computes them in "
              "fp32/fp16; the next weighted op's input quantizer requantizes the result")
FLOAT_REASONS = {
    **dict.fromkeys(("silu", "hardswish", "hardsigmoid", "gelu", "sigmoid", "tanh"), _POINTWISE),
    "mul": ("TensorRT computes elementwise multiplies (SE gates, layer scales) in fp32/fp16, fused with their "
            "producer; Q/DQ goes on the next weighted op's input"),
    "layer_norm": "TensorRT has no int8 normalization kernel: LayerNorm runs in fp32/fp16",
    "softmax": "TensorRT runs Softmax in fp32/fp16; the MatMul that reads it quantizes its output",
    "masked_softmax": "TensorRT runs masked Softmax in fp32/fp16; the MatMul that reads it quantizes its output",
    "position_bias": ("computed from parameters only (the same tensor for every input): runs in float and "
                      "TensorRT folds it into a constant"),
    "window_attention": ("torchvision wraps shifted_window_attention with torch.fx.wrap (data-dependent padding "
                         "and shifts), so it is traced as one call: its Linear layers and matmuls run in float"),
}

TENSORRT = Backend(
    name="tensorrt",
    description="TensorRT explicit quantization: int8 Q/DQ on weighted-op inputs and residual skip inputs",
    weight=QuantSpec(num_bits=8, axis=0, narrow_range=True),
    activation=QuantSpec(num_bits=8, calib_method="mse"),
    rules=(
        Rule("weighted_input", Pattern.chain(("op", WEIGHTED_KINDS)), Targets(inputs="op", weight="op"),
             checks=(quantizable_weight("op"), float_stem("op", None)), priority=20),
        Rule("matmul_inputs", Pattern.chain(("op", "matmul")), Targets(inputs="op"), priority=20),
        Rule("residual_add", Pattern.chain(("add", "add")), handler=residual_add,
             checks=(output_reaches_int8("add"),), priority=10),
        Rule("concat_shared_scale", Pattern.chain(("cat", "cat")), handler=concat_shared_scale, priority=10),
    ),
    passthrough=frozenset({"relu", "relu6", "hardtanh", "max_pool", "avg_pool", "mean", "pad", "roll", "reshape",
                           "permute", "split", "getitem", "identity", "batch_norm"}),
    float_reasons=FLOAT_REASONS,
    runtime="tensorrt",  # verified for its meaning in ORT, linted against TensorRT's Q/DQ fusion rules
)
