"""A static lint of a QDQ model against TensorRT's documented Q/DQ fusion rules (explicit quantization).

From TensorRT's developer guide ("Working with Quantized Types", Q/DQ layer-placement recommendations) and
NVIDIA/TensorRT#1992: TensorRT fuses a DequantizeLinear into the weighted layer that reads it (Conv,
ConvTranspose, Gemm/MatMul: quantize their inputs and weights); a residual Add fuses into the Conv that produces
one of its inputs when the *other* input carries Q/DQ; Q/DQ propagates across commuting ops (ReLU, pooling,
reshapes, transposes, concat, slicing). Anything else after a DequantizeLinear cannot absorb it: the DQ runs as
its own scale layer and the op in fp16/fp32. Each finding names what TensorRT would run in higher precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from fxquant.lower.graph import WEIGHTED_OPS, OnnxGraph

COMMUTING = frozenset({"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Reshape", "Transpose", "Flatten",
                       "Squeeze", "Unsqueeze", "Concat", "Slice", "Pad", "Resize", "Identity", "Clip"})


@dataclass(frozen=True)
class LintFinding:
    node: str
    op_type: str
    reason: str


def _quantized(name: str, producer: dict, inits: set) -> bool:
    """True when ``name`` is a DequantizeLinear output, looking back through ops Q/DQ commutes with."""
    node = producer.get(name)
    while node is not None and node.op_type in COMMUTING - {"Concat"}:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def _outlier_side_path(node: onnx.NodeProto, producer: dict, inits: set) -> bool:
    """A float MatMul of a few gathered input channels and a constant weight: the outlier channels that
    ``fxquant.ptq.outlier_channels`` runs in float beside an int8 Linear on purpose."""
    source = producer.get(node.input[0])
    return (node.op_type == "MatMul" and source is not None and source.op_type == "Gather"
            and source.input[1] in inits and (node.input[1] in inits or _constant(node.input[1], producer, inits)))


def _constant(name: str, producer: dict, inits: set) -> bool:
    """True when ``name`` is computed from initializers alone (a transposed weight the exporter left)."""
    node = producer.get(name)
    return node is not None and node.op_type in {"Transpose", "Identity"} and node.input[0] in inits


def trt_fusion_lint(proto: onnx.ModelProto) -> list[LintFinding]:
    """What TensorRT would run in higher precision, per its Q/DQ fusion rules; empty when everything fuses."""
    g = OnnxGraph(proto)
    producer, consumers, inits = g.producer, g.consumers, set(g.initializers)
    findings = []
    for node in g.graph.node:
        if _outlier_side_path(node, producer, inits):
            continue  # float by design: fxquant.ptq.outlier_channels, listed in report_of(model).ptq
        if node.op_type in WEIGHTED_OPS:
            operands = node.input[:2]
            missing = [i for i in operands if i and not _quantized(i, producer, inits)]
            if missing:
                findings.append(LintFinding(node.name, node.op_type, f"input(s) {missing} carry no Q/DQ: TensorRT "
                                            f"runs this {node.op_type} in fp16/fp32"))
        elif node.op_type == "Add" and len(node.input) == 2:
            quantized = [_quantized(i, producer, inits) for i in node.input]
            if sum(quantized) == 1:
                other = producer.get(node.input[quantized.index(False)])
                if other is None or other.op_type not in WEIGHTED_OPS:
                    findings.append(LintFinding(node.name, "Add", "residual add with one Q/DQ input whose other "
                                                "input does not come from a Conv/Gemm: nothing to fuse it into, it "
                                                "runs in fp16/fp32"))
        elif node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            stranded = sorted({c.op_type for c in consumers.get(node.output[0], [])
                               if c.op_type not in WEIGHTED_OPS | COMMUTING | {"Add", "QuantizeLinear"}})
            if stranded:
                findings.append(LintFinding(node.name, "DequantizeLinear", f"Q/DQ stranded before {stranded}, which "
                                            "TensorRT cannot fuse it into: the DQ runs as a scale layer and the op "
                                            "in fp16/fp32"))
    return findings
