"""ONNX Runtime (CPU) QDQ placement: every quantized op sees DQ -> op -> Q, so ORT fuses it.

- uint8 affine activations, int8 symmetric per-channel weights: the combination ORT fuses on x86.
- Weights are saturation-aware: without VNNI, ORT's u8s8 kernels add pairs of adjacent u8*s8 products in
  16 bits, which can saturate with full 8-bit weights (255 * 127 * 2 > 32767). After calibration each layer
  gets 8-bit weights when none of its adjacent weight pairs can overflow, else 7 bits ([-63, 63], as torch.ao's
  fbgemm configs and ORT's ``reduce_range`` use everywhere); see fxquant.ptq.weight_widths. Declare
  ``QuantConfig(target="vnni")`` for VNNI/AMX CPUs (plain 8 bits everywhere: they accumulate exactly).
- ``LINEAR_FLOAT_OUTPUT``: a Linear whose output only reaches float ops keeps a float output (a uint8 output
  there would hold the residual branch's outlier channels with one scale, or requantize logits for nothing);
  export writes it as MatMulIntegerToFloat, an integer kernel with a float output.
- A stem conv (reads the model input, at most ``STEM_MAX_REDUCTION`` products per output, an image-sized output
  map: MobileNet and EfficientNet stems) stays float: faster in ORT and spared the 8-bit input
  (``QuantConfig(float_stem=False)`` quantizes it).
- Q/DQ on the inputs and outputs of Conv, Gemm, MatMul, Add, Mul, Concat and average pooling; a ReLU/Clip
  right after Conv/Gemm/Add is absorbed by the output quantizer (ORT removes it); max-pool, reshapes and
  concat share one scale between input and output so ORT can drop their Q/DQ.
- Sigmoid and Softmax get Q/DQ on input and output (ORT's QLinearSigmoid / QLinearSoftmax); MatMul has both
  inputs quantized (QLinearMatMul), so attention's Q @ K^T and softmax @ V run in int8.
- An Add/Mul whose output only reaches ops ORT runs in float (the residual stream of a pre-norm transformer,
  read by LayerNorms) stays float: a QLinearAdd there would requantize the stream at every block and feed
  no int8 kernel.
- Add/Mul with a constant tensor operand (a layer scale, a position embedding) quantize the constant too, per
  tensor with the activation type (QLinearAdd/QLinearMul take one uint8 scale per input), calibrated by max.
- Ops ORT has no int8 kernel or QDQ fusion for (SiLU, Hardswish, Hardsigmoid, GELU, tanh, LayerNorm, unfolded
  BatchNorm, ReduceMean, Pad, slicing) stay float between DequantizeLinear and QuantizeLinear, with that reason.
"""

from __future__ import annotations

from torch import fx

from fxquant.backends.base import Backend
from fxquant.backends.checks import (
    float_stem,
    int8_consumers,
    output_reaches_int8,
    quantizable_weight,
    two_activation_inputs,
)
from fxquant.ops.kinds import WEIGHTED_KINDS
from fxquant.rules import Match, Pattern, Rule, Targets, single_user
from fxquant.rules.context import RuleContext
from fxquant.rules.rule import Check
from fxquant.spec import QuantSpec

CLAMPS = frozenset({"relu", "relu6", "hardtanh"})
STEM_MAX_REDUCTION, STEM_MIN_POSITIONS = 32, 32 * 32
"""A conv reading the model input with at most this many products per output (3 x 3 x 3 = 27: MobileNet and
EfficientNet stems) and an output map of at least 32 x 32 in the example (an image model's stem; measured at 112 x
112) stays float. Measured with ORT on 2 AVX2 cores (docs/ptq.md): float stems are faster
(EfficientNet-Lite0 12.3 vs 15.7 ms, MobileNetV2 10.2 vs 11.3, MobileNetV3-Small 2.6 vs 3.3, EfficientNet-B0 25.0
vs 26.6) and far more accurate where 8-bit input quantization is amplified (EfficientNet-Lite0 22.5 vs 16.1 dB,
MobileNetV2 17.7 vs 16.9 dB); ResNet's 7 x 7 x 3 = 147 runs faster in int8 (22.2 vs 26.7 ms) and stays int8."""
BINARY = frozenset({"add", "mul"})


def binary_with_constant(match: Match, ctx: RuleContext) -> str | None:
    """Add/Mul of one activation and one constant tensor: quantize both inputs and the output (QLinearAdd/Mul)."""
    op = match["op"]
    acts = ctx.activation_inputs(op)
    consts = [a for a in op.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    if len(acts) != 1 or len(consts) != 1:
        return (f"`{op.name}` combines {len(acts)} activation tensor(s) with {len(consts)} constant tensor(s) "
                "(a Python number has no tensor to quantize): ORT's QLinearAdd/QLinearMul need two quantized tensors")
    ctx.request_input(op, acts[0], "binary_constant")
    spec = ctx.spec(op, "activation").with_(calib_method="max")  # the constant's exact range
    ctx.request_input(op, consts[0], "binary_constant", spec=spec)
    ctx.request_output(op, "binary_constant")
    return None


def output_stays_float(name: str) -> Check:
    """Take a Linear whose output only reaches float ops (the residual add before a LayerNorm): its inputs are
    quantized but not its output, which ORT runs as MatMulIntegerToFloat. A uint8 output there would have to
    hold the residual branch's outlier channels with one scale."""

    def check(match: Match, ctx: RuleContext) -> str | None:
        if int8_consumers(ctx.view, ctx.backend).get(match[name]) is None:
            return f"`{match[name].name}` output reaches an int8 op"
        return None

    return check


def _no_kernel(what: str) -> str:
    return f"ONNX Runtime has no int8 {what} kernel or QDQ fusion: it runs in float between DequantizeLinear and " \
           "QuantizeLinear"


FLOAT_REASONS = {
    "silu": _no_kernel("SiLU"), "hardswish": _no_kernel("HardSwish"), "hardsigmoid": _no_kernel("HardSigmoid"),
    "gelu": _no_kernel("GELU"), "tanh": _no_kernel("Tanh"), "layer_norm": _no_kernel("LayerNormalization"),
    "batch_norm": _no_kernel("BatchNormalization") + " (a BatchNorm that follows no conv cannot be folded)",
    "mean": _no_kernel("ReduceMean"), "pad": _no_kernel("Pad"),
    "roll": "a roll exports as Slice + Concat, which runs on the dequantized tensor",
    **dict.fromkeys(("relu", "relu6", "hardtanh"), "ORT folds a ReLU/Clip only into the QuantizeLinear after a fused "
                    "Conv/Gemm/Add; after a float op (e.g. an unfolded BatchNorm) it runs in float"),
    "masked_softmax": ("softmax over masked attention scores (-inf where masked) runs in float: no 8-bit scale "
                       "holds the mask; the matmuls around it stay int8"),
    "split": "ORT fuses Split only with equal Q/DQ on every output; fxquant leaves split/chunk in float",
    "getitem": "slicing runs in float on the dequantized tensor; the next quantized op requantizes it",
    "position_bias": ("computed from parameters only (the same tensor for every input): runs in float and "
                      "ORT folds it into a constant"),
    "window_attention": ("torchvision wraps shifted_window_attention with torch.fx.wrap (data-dependent padding "
                         "and shifts), so it is traced as one call: its Linear layers and matmuls run in float"),
}

LINEAR_FLOAT_OUTPUT = Rule("linear_float_output", Pattern.chain(("op", "linear")), Targets(inputs="op", weight="op"),
                           checks=(quantizable_weight("op"), output_stays_float("op")), priority=25)
"""A Linear whose output only reaches float ops (GELU, the residual add before a LayerNorm; the model output
decides nothing) keeps a float output: export writes it as ORT's MatMulIntegerToFloat
(``Backend.integer_float_output``). Measured on all-MiniLM-L6-v2: cosine 0.995 (0.951 with a uint8 output),
export check 26 dB (12.5 dB), see docs/benchmarks.md."""

STEM = float_stem("op", STEM_MAX_REDUCTION, STEM_MIN_POSITIONS)

ONNXRUNTIME = Backend(
    name="onnxruntime",
    description=("ONNX Runtime CPU: uint8 activations, int8 per-channel weights (8 bits where the u8s8 int16 "
                 "accumulation cannot saturate, else 7), fully fused QDQ"),
    weight=QuantSpec(num_bits=7, axis=0, narrow_range=True),
    activation=QuantSpec(num_bits=8, symmetric=False, calib_method="percentile", percentile=99.99),
    rules=(
        LINEAR_FLOAT_OUTPUT,
        Rule("weighted_clamp", Pattern.chain(("op", WEIGHTED_KINDS), ("act", CLAMPS)),
             Targets(inputs="op", weight="op", output="act"),
             checks=(quantizable_weight("op"), STEM, single_user("op")), priority=30),
        Rule("weighted", Pattern.chain(("op", WEIGHTED_KINDS)), Targets(inputs="op", weight="op", output="op"),
             checks=(quantizable_weight("op"), STEM), priority=20),
        Rule("binary_clamp", Pattern.chain(("op", BINARY), ("act", CLAMPS)), Targets(inputs="op", output="act"),
             checks=(output_reaches_int8("act"), single_user("op"), two_activation_inputs("op")), priority=30),
        Rule("binary", Pattern.chain(("op", BINARY)), Targets(inputs="op", output="op"),
             checks=(output_reaches_int8("op"), two_activation_inputs("op")), priority=20),
        Rule("binary_constant", Pattern.chain(("op", BINARY)), handler=binary_with_constant,
             checks=(output_reaches_int8("op"),), priority=15),
        Rule("matmul", Pattern.chain(("op", "matmul")), Targets(inputs="op", output="op"), priority=20),
        Rule("sigmoid_softmax", Pattern.chain(("op", {"sigmoid", "softmax"})), Targets(inputs="op", output="op"),
             priority=20),
        Rule("avg_pool", Pattern.chain(("op", "avg_pool")), Targets(inputs="op", output="op"), priority=20),
        Rule("concat", Pattern.chain(("op", "cat")), Targets(inputs="op", output="op", share=True), priority=20),
        Rule("same_scale", Pattern.chain(("op", {"max_pool", "reshape", "permute", "identity"})),
             Targets(inputs="op", output="op", share=True), priority=10),
    ),
    passthrough=frozenset(),
    float_reasons=FLOAT_REASONS,
    runtime="onnxruntime",  # verified as deployed: ORT's fused int8 kernels
    export_passes=("ort_cpu_graph",  # Gelu fused, no SkipLayerNormalization (slower on CPU than Add + LayerNorm)
                   "integer_float_output",  # float-output Linears (LINEAR_FLOAT_OUTPUT) run as MatMulIntegerToFloat
                   "int32_bias"),  # ORT fuses QLinearConv/QGemm only with an int32 bias
    saturation_aware_weights=True,
    bias_correction="input_means",  # EfficientNet-Lite0 +1.6 dB, MobileNetV2 +0.5 dB (docs/ptq.md)
)
