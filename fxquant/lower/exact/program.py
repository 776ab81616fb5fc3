"""ORT's optimized graph as a torch program: one GraphModule node per ORT node, each an exact torch kernel.

``build_program(proto, target)`` reads the graph ONNX Runtime made of a QDQ model at ``ORT_ENABLE_EXTENDED``
(every QDQ fusion done; level 3 only changes layouts, bit-identical results) and writes a ``torch.fx``
GraphModule that calls, per ORT node, the kernel ``KERNELS`` declares for its op type: integer kernels
(``fxquant.lower.exact.integer``, ``.elementwise``) for the fused int8 ops, ONNX semantics (``.onnx_ops``) for
the rest. Initializers become buffers; nodes and values keep their ONNX names (``ProgramNode.tensor``), so a
value can be traced back to the ONNX tensor it computes.
"""

from __future__ import annotations

import keyword
import operator
import re
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from fxquant.errors import ConversionError
from fxquant.lower.exact import elementwise as E
from fxquant.lower.exact import integer as I
from fxquant.lower.exact import onnx_ops as O
from fxquant.lower.exact.arith import sqrt32

MS = "com.microsoft"

KERNELS: dict[tuple[str, str], Callable] = {
    # integer kernels: what ORT fused the QDQ groups into
    ("", "QLinearConv"): I.qlinear_conv, (MS, "QLinearConv"): I.qlinear_conv,
    ("", "QLinearMatMul"): I.qlinear_matmul, (MS, "QGemm"): I.qgemm,
    ("", "MatMulInteger"): I.matmul_integer, (MS, "MatMulIntegerToFloat"): I.matmul_integer_to_float,
    (MS, "DynamicQuantizeMatMul"): I.dynamic_quantize_matmul,
    ("", "DynamicQuantizeLinear"): lambda x, **_: I.dynamic_quantize(x),
    ("", "QuantizeLinear"): E.quantize_linear, ("", "DequantizeLinear"): E.dequantize_linear,
    (MS, "QuantizeLinear"): E.quantize_linear, (MS, "DequantizeLinear"): E.dequantize_linear,
    (MS, "QLinearAdd"): E.qlinear_add, (MS, "QLinearMul"): E.qlinear_mul,
    (MS, "QLinearSigmoid"): E.qlinear_sigmoid, (MS, "QLinearLeakyRelu"): E.qlinear_leaky_relu,
    (MS, "QLinearConcat"): E.qlinear_concat, (MS, "QLinearSoftmax"): E.qlinear_softmax,
    (MS, "QLinearAveragePool"): E.qlinear_average_pool,
    (MS, "QLinearGlobalAveragePool"): E.qlinear_global_average_pool,
    # tensor plumbing
    ("", "Reshape"): O.reshape, ("", "Transpose"): O.transpose, ("", "Flatten"): O.flatten,
    ("", "Squeeze"): O.squeeze, ("", "Unsqueeze"): O.unsqueeze, ("", "Concat"): O.concat, ("", "Split"): O.split,
    ("", "Slice"): O.slice_, ("", "Gather"): O.gather, ("", "GatherND"): O.gather_nd,
    ("", "GatherElements"): O.gather_elements, ("", "Shape"): O.shape,
    ("", "Expand"): O.expand,
    ("", "Cast"): O.cast, ("", "Identity"): O.identity, ("", "ConstantOfShape"): O.constant_of_shape,
    ("", "Range"): O.range_, ("", "Where"): O.where, ("", "Tile"): O.tile, ("", "Pad"): O.pad,
    ("", "CumSum"): O.cum_sum, ("", "Trilu"): O.trilu,
    ("", "MaxPool"): O.max_pool,
    # float arithmetic
    ("", "Add"): O._binary(operator.add), ("", "Sub"): O._binary(operator.sub),
    ("", "Mul"): O._binary(operator.mul), ("", "Div"): O.div, ("", "Pow"): O._binary(torch.pow),
    ("", "Equal"): O._binary(torch.eq), ("", "Less"): O._binary(torch.lt), ("", "Greater"): O._binary(torch.gt),
    ("", "GreaterOrEqual"): O._binary(torch.ge), ("", "LessOrEqual"): O._binary(torch.le),
    ("", "Xor"): O._binary(torch.logical_xor), ("", "Mod"): O.mod,
    ("", "And"): O._binary(torch.logical_and), ("", "Or"): O._binary(torch.logical_or),
    ("", "Not"): lambda x, **_: torch.logical_not(x), ("", "Neg"): lambda x, **_: -x,
    ("", "Abs"): lambda x, **_: x.abs(),
    ("", "Floor"): lambda x, **_: torch.floor(x), ("", "Ceil"): lambda x, **_: torch.ceil(x),
    ("", "Round"): lambda x, **_: torch.round(x), ("", "Sqrt"): lambda x, **_: sqrt32(x),
    ("", "Reciprocal"): lambda x, **_: 1.0 / x, ("", "Exp"): lambda x, **_: torch.exp(x),
    ("", "Log"): lambda x, **_: torch.log(x), ("", "Erf"): O.erf, ("", "Tanh"): lambda x, **_: O.floats.tanh(x),
    ("", "Sigmoid"): lambda x, **_: O.floats.mlas_logistic(x), ("", "Relu"): lambda x, **_: torch.relu(x),
    ("", "Clip"): O.clip, ("", "HardSigmoid"): O.hard_sigmoid, ("", "LeakyRelu"): O.leaky_relu,
    ("", "Max"): lambda *xs, **_: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    ("", "Min"): lambda *xs, **_: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    ("", "Sum"): O.sum_, ("", "Softmax"): O.softmax, ("", "MatMul"): O.matmul, ("", "Gemm"): O.gemm,
    ("", "Conv"): O.conv, (MS, "FusedConv"): O.conv, (MS, "FusedGemm"): O.fused_gemm,
    ("", "ConvTranspose"): O.conv_transpose, ("", "AveragePool"): O.average_pool,
    ("", "GlobalAveragePool"): O.global_average_pool, ("", "BatchNormalization"): O.batch_norm,
    ("", "LayerNormalization"): O.layer_norm, (MS, "Gelu"): O.gelu,
    (MS, "MultiHeadAttention"): O.multi_head_attention,
    ("", "ReduceMean"): O.reduce(torch.mean), ("", "ReduceSum"): O.reduce(torch.sum),
    ("", "ReduceMax"): O.reduce(lambda x, dim, keepdim: x.amax(dim, keepdim)),
}
"""(domain, op type) -> kernel(*inputs, target=..., **attributes); absent optional inputs are None."""


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = torch.from_numpy(np.array(numpy_helper.to_array(value)))
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        elif isinstance(value, (onnx.GraphProto, onnx.TypeProto)):
            raise ConversionError(f"`{node.name}` ({node.op_type}) has a subgraph attribute, which the exact program "
                                  "does not run")
        out[a.name] = value
    return out


def _ident(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "t"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = f"t_{base}"
    out, k = base, 0
    while out in taken:
        k += 1
        out = f"{base}_{k}"
    taken.add(out)
    return out


class Program(fx.GraphModule):
    """A GraphModule built from an ONNX graph; ``tensor_names`` maps each fx node name to its ONNX tensor."""

    tensor_names: dict[str, str]
    input_names: list[str]


def build_program(proto: onnx.ModelProto, target: str) -> Program:
    """The torch program that computes ``proto`` (an ORT-optimized graph) with exact kernels for ``target``."""
    graph = proto.graph
    unknown = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.node
                      if (n.domain if n.domain != "ai.onnx" else "", n.op_type) not in KERNELS
                      and n.op_type != "Constant"})
    if unknown:
        raise ConversionError(f"ONNX Runtime's graph has op(s) the exact program has no kernel for: "
                              f"{', '.join(unknown)}")
    root = nn.Module()
    fxg = fx.Graph()
    taken: set[str] = set()
    values: dict[str, fx.Node] = {}
    names: dict[str, str] = {}
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    for name in inputs:
        values[name] = fxg.placeholder(_ident(name, taken))
        names[values[name].name] = name
    for t in graph.initializer:
        attr = _ident(t.name, taken)
        root.register_buffer(attr, torch.from_numpy(np.array(numpy_helper.to_array(t))), persistent=False)
        values[t.name] = fxg.get_attr(attr)
        names[values[t.name].name] = t.name
    for node in graph.node:
        if node.op_type == "Constant":
            attr = _ident(node.output[0], taken)
            value = next(iter(_attributes(node).values()))
            root.register_buffer(attr, torch.as_tensor(value), persistent=False)
            values[node.output[0]] = fxg.get_attr(attr)
            continue
        fn = KERNELS[(node.domain if node.domain != "ai.onnx" else "", node.op_type)]
        args = tuple(values[i] if i else None for i in node.input)
        kwargs = {**_attributes(node), "target": target}
        call = fxg.call_function(fn, args, kwargs)
        call.name = _ident(node.name or node.output[0], taken)
        call.meta["onnx_node"] = node.name
        outputs = [o for o in node.output]
        if len(outputs) == 1:
            values[outputs[0]] = call
            names[call.name] = outputs[0]
        else:
            for k, out in enumerate(outputs):
                if out:
                    item = fxg.call_function(operator.getitem, (call, k))
                    item.name = _ident(out, taken)
                    values[out] = item
                    names[item.name] = out
    fxg.output(tuple(values[o.name] for o in graph.output))
    program = Program(root, fxg, class_name="ExactProgram")
    program.tensor_names = names
    program.input_names = inputs
    return program
