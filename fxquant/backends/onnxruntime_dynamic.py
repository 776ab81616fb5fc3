"""ONNX Runtime (CPU) with dynamic activations: the recipe for transformers (``onnxruntime_dynamic``).

- Every Linear: its input quantized to uint8 with the range of each forward's own data
  (``QuantSpec(dynamic=True)``, ONNX DynamicQuantizeLinear), its weight int8 symmetric per output channel, its
  output float. Export writes DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) ->
  Add(bias), which ORT fuses into DynamicQuantizeMatMul: an integer kernel for every Linear, no calibration
  for activations (calibration only runs SmoothQuant and sets the weight ranges).
- Weights are saturation-aware, as the ``onnxruntime`` preset's: without VNNI, ORT's u8s8 kernels add pairs of
  u8*s8 products in 16 bits, which saturate with plain 8-bit weights (dynamic ranges always fill all 256 uint8
  codes); after calibration each Linear gets 8-bit codes with every adjacent pair kept below the limit, 7 bits
  where that fails (``fxquant.ptq.weight_widths``). On MiniLM that lifts the worst sentence's cosine from
  0.955 (7 bits) to 0.980 at the same speed. Declare ``QuantConfig(target="vnni")`` for VNNI/AMX CPUs (plain
  8 bits everywhere).
- Everything else runs in float (as ORT's ``quantize_dynamic`` leaves it): attention's matmuls, softmax, GELU,
  LayerNorm and the residual adds, each reported with its reason.
"""

from __future__ import annotations

from fxquant.backends.base import Backend
from fxquant.backends.checks import quantizable_weight
from fxquant.rules import Pattern, Rule, Targets
from fxquant.spec import QuantSpec

_FLOAT = "the onnxruntime_dynamic recipe quantizes only Linear layers (DynamicQuantizeMatMul); {} runs in float"
FLOAT_REASONS = {
    kind: _FLOAT.format(what) for kind, what in (
        ("matmul", "a matmul of two activations (attention scores and context)"), ("softmax", "softmax"),
        ("masked_softmax", "softmax"), ("add", "an add"), ("mul", "a mul"), ("gelu", "GELU"), ("silu", "SiLU"),
        ("tanh", "tanh"), ("sigmoid", "sigmoid"), ("layer_norm", "LayerNorm"), ("conv", "a convolution"),
        ("conv_transpose", "a transposed convolution"), ("relu", "ReLU"), ("cat", "a concat"),
        ("mean", "a mean"), ("avg_pool", "pooling"), ("max_pool", "pooling"), ("batch_norm", "BatchNorm"),
        ("hardswish", "HardSwish"), ("hardsigmoid", "HardSigmoid"), ("pad", "a pad"), ("split", "a split"),
        ("getitem", "slicing"))
}

ONNXRUNTIME_DYNAMIC = Backend(
    name="onnxruntime_dynamic",
    description="ONNX Runtime CPU: dynamic uint8 inputs and saturation-aware int8 per-channel weights for Linear "
                "layers (DynamicQuantizeMatMul), everything else float",
    weight=QuantSpec(num_bits=7, axis=0, narrow_range=True),
    activation=QuantSpec(num_bits=8, symmetric=False, dynamic=True),
    rules=(Rule("linear_dynamic", Pattern.chain(("op", "linear")), Targets(inputs="op", weight="op"),
                checks=(quantizable_weight("op"),), priority=20),),
    passthrough=frozenset({"reshape", "permute", "identity"}),
    float_reasons=FLOAT_REASONS,
    runtime="onnxruntime",  # verified as deployed: DynamicQuantizeMatMul
    # no int32 bias: the bias is added in float after MatMulInteger's rescale
    export_passes=("ort_cpu_graph",),  # Gelu fused, no SkipLayerNormalization (slower on CPU than Add + LayerNorm)
    saturation_aware_weights=True,  # 8-bit codes where no adjacent pair can overflow ORT's int16 u8s8 sums
)
