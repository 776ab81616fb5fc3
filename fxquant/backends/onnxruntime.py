"""ONNX Runtime (CPU) QDQ placement: every quantized op sees DQ -> op -> Q, so ORT fuses it.

- uint8 affine activations, int8 symmetric per-channel weights: the combination ORT fuses on x86.
- Weights use 7 bits ([-63, 63]) by default: without VNNI, ORT's u8s8 kernels add pairs of u8*s8 products in
  16 bits, which saturate with full 8-bit weights (255 * 127 * 2 > 32767). torch.ao's fbgemm configs and
  ORT's ``reduce_range`` do the same. Pass ``QuantConfig(weight=QuantSpec(8, axis=0, narrow_range=True))``
  on VNNI/ARM machines.
- Q/DQ on the inputs and outputs of Conv, Gemm, MatMul, Add, Mul, Concat and average pooling; a ReLU/Clip
  right after Conv/Gemm/Add is absorbed by the output quantizer (ORT removes it); max-pool, reshapes and
  concat share one scale between input and output so ORT can drop their Q/DQ.
"""

from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.checks import quantizable_weight, two_activation_inputs
from fxquant.ops import WEIGHTED_KINDS
from fxquant.rules import Pattern, Quantize, Rule, single_user
from fxquant.spec import QuantSpec

CLAMPS = frozenset({"relu", "relu6", "hardtanh"})
BINARY = frozenset({"add", "mul"})

ONNXRUNTIME = Backend(
    name="onnxruntime",
    description="ONNX Runtime CPU: uint8 activations, 7-bit int8 per-channel weights, fully fused QDQ",
    weight=QuantSpec(num_bits=7, axis=0, narrow_range=True),
    activation=QuantSpec(num_bits=8, symmetric=False, calib_method="mse"),
    rules=(
        Rule("weighted_clamp", Pattern.chain(("op", WEIGHTED_KINDS), ("act", CLAMPS)),
             Quantize(inputs="op", weight="op", output="act"),
             checks=(quantizable_weight("op"), single_user("op")), priority=30),
        Rule("weighted", Pattern.chain(("op", WEIGHTED_KINDS)), Quantize(inputs="op", weight="op", output="op"),
             checks=(quantizable_weight("op"),), priority=20),
        Rule("binary_clamp", Pattern.chain(("op", BINARY), ("act", CLAMPS)), Quantize(inputs="op", output="act"),
             checks=(single_user("op"), two_activation_inputs("op")), priority=30),
        Rule("binary", Pattern.chain(("op", BINARY)), Quantize(inputs="op", output="op"),
             checks=(two_activation_inputs("op"),), priority=20),
        Rule("matmul", Pattern.chain(("op", "matmul")), Quantize(inputs="op", output="op"), priority=20),
        Rule("avg_pool", Pattern.chain(("op", "avg_pool")), Quantize(inputs="op", output="op"), priority=20),
        Rule("concat", Pattern.chain(("op", "cat")), Quantize(inputs="op", output="op", share=True), priority=20),
        Rule("same_scale", Pattern.chain(("op", {"max_pool", "reshape", "permute", "identity"})),
             Quantize(inputs="op", output="op", share=True), priority=10),
    ),
    passthrough=frozenset(),
)
