"""The ONNX passes export_onnx runs on the exported QDQ model, in order, in one place.

Every export runs the common passes (weights into integer initializers, dynamic Linears into the integer pattern
ORT fuses, spatial ReduceMean into GlobalAveragePool, zero Pads into the Convs they feed), then the backend's
passes of ``Backend.export_passes`` that rewrite the graph as exported, then names every node after its module,
then the backend's passes that work on named nodes; each in the order the backend lists them. A pass edits the
ModelProto in place through ``fxquant.lower.graph.OnnxGraph``. ``EXPORT_PASSES`` holds the passes a backend
can name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from fxquant.lower.onnx_passes import (
    fold_weight_quantization,
    global_average_pools,
    merge_pads,
    name_nodes,
    quantize_biases,
)
from fxquant.lower.ort.attention import multi_head_attention
from fxquant.lower.ort.cpu_graph import for_ort_cpu
from fxquant.lower.ort.dynamic_matmul import dynamic_matmuls, merge_shared_input
from fxquant.lower.ort.static_matmul import integer_to_float_matmuls
from fxquant.lower.outputs import strip_wrapper_prefix


@dataclass(frozen=True)
class ExportPass:
    """An ONNX pass a backend can ask for: ``run(proto)`` edits the model in place; ``named``: it runs after the
    nodes are named after their modules (a pass whose new nodes take the name of the node they replace), else on
    the graph as exported (its new nodes are named with the rest)."""

    run: Callable[[onnx.ModelProto], object]
    named: bool
    doc: str


def _dynamic_linears(proto: onnx.ModelProto) -> None:
    if dynamic_matmuls(proto):
        merge_shared_input(proto)


def _ort_cpu_graph(proto: onnx.ModelProto) -> None:
    for_ort_cpu(proto)
    multi_head_attention(proto)  # float attention blocks: one ORT kernel each


COMMON = (fold_weight_quantization, _dynamic_linears, global_average_pools,
          merge_pads)  # zero pads (asymmetric "same" padding) into the Convs they feed: no float Pad left

EXPORT_PASSES: dict[str, ExportPass] = {
    "ort_cpu_graph": ExportPass(_ort_cpu_graph, named=False, doc=(
        "float ops in the forms ONNX Runtime's CPU kernels run fastest, same values (GELU in the order ORT fuses, "
        "residual adds before LayerNorm as Sum: fxquant.lower.ort.cpu_graph; float attention blocks as ORT's "
        "MultiHeadAttention: fxquant.lower.ort.attention)")),
    "integer_float_output": ExportPass(integer_to_float_matmuls, named=True, doc=(
        "a Linear with a quantized input and weight but a float output as ORT's MatMulIntegerToFloat "
        "(fxquant.lower.ort.static_matmul), which ORT would otherwise run in float")),
    "int32_bias": ExportPass(quantize_biases, named=True, doc=(
        "the bias of each quantized Conv/Gemm as int32 codes (scale s_x * s_w) read by a DequantizeLinear, as ONNX "
        "Runtime needs to fuse QLinearConv/QGemm; TensorRT takes float biases")),
}


def run_export_passes(proto: onnx.ModelProto, backend_passes: tuple[str, ...], wrapped: bool = False) -> None:
    """The common passes, the backend's passes on the graph as exported, node naming (``wrapped``: drop the
    output wrapper's name prefix), then the backend's passes on named nodes."""
    passes = [EXPORT_PASSES[name] for name in backend_passes]
    for run in COMMON:
        run(proto)
    for p in passes:
        if not p.named:
            p.run(proto)
    name_nodes(proto)
    if wrapped:
        strip_wrapper_prefix(proto)
    for p in passes:
        if p.named:
            p.run(proto)
