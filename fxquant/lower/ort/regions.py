"""A QDQ model with some weighted ops run in float: the regions tune() may leave unquantized.

The graph splits into *layers* (Conv/Gemm/MatMul reading a dequantized constant weight) and *glue*: every other
op, activation Q/DQ pairs included. Glue ops joined by a tensor form one component (a residual block's adds and
pools, the pair between two convs). Running a set of layers in float means: their constant weights and biases
become float initializers, and a glue component's activation Q/DQ pairs are removed when every layer it touches
runs in float (a pair next to an int8 layer stays: that layer reads or writes int8 through it). A quantizer used at
several places keeps all its pairs unless all of them can go, so each decision is one quantizer module in torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fxquant.lower.graph import WEIGHTED_OPS, OnnxGraph
from fxquant.lower.ort.static_matmul import integer_to_float_matmuls, unfuse_integer_matmuls


@dataclass(frozen=True)
class OnnxLayer:
    """A weighted op of the QDQ graph: its node name, the module that owns it and its weight quantizer."""

    node: str
    module: str
    weight_quantizer: str


def quantizer_of(node: onnx.NodeProto) -> str:
    """The quantizer module a Q/DQ node belongs to (its scale initializer is ``<module path>.scale``)."""
    return node.input[1].removesuffix(".scale")


class RegionGraph:
    """Layers, glue components and the activation Q/DQ pairs of one QDQ model."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        view = OnnxGraph(proto)
        graph, inits = proto.graph, view.initializers
        self.producer = {o: n.name for o, n in view.producer.items()}
        self.nodes = {n.name: n for n in graph.node}
        self.constant_dq = {n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
        self.layers: dict[str, OnnxLayer] = {}
        self.weight_path: dict[str, str] = {}  # a Transpose between a weight's DQ and its MatMul -> the layer
        for n in graph.node:
            weight = self.producer.get(n.input[1]) if n.op_type in WEIGHTED_OPS and len(n.input) > 1 else None
            node = self.nodes.get(weight) if weight is not None else None
            if node is not None and node.op_type == "Transpose" and self.producer.get(node.input[0]) in \
                    self.constant_dq:  # a Linear's (out, in) weight read by a MatMul: DQ -> Transpose -> MatMul
                self.weight_path[weight] = n.name
                weight = self.producer[node.input[0]]
            if weight in self.constant_dq:
                self.layers[n.name] = OnnxLayer(n.name, n.name.rpartition("/")[0] or n.name,
                                          quantizer_of(self.nodes[weight]))
        glue = [n for n in graph.node if n.name not in self.layers and n.name not in self.constant_dq
                and n.name not in self.weight_path]
        parent = {n.name: n.name for n in glue}

        def find(a: str) -> str:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for n in glue:
            for i in n.input:
                src = self.producer.get(i)
                if src in parent:
                    parent[find(src)] = find(n.name)
        self.component = {n.name: find(n.name) for n in glue}
        self.consumers = view.consumers
        self.touches: dict[str, set[str]] = {}  # component -> the layers it reads from or feeds
        for layer in self.layers:
            node = self.nodes[layer]
            neighbours = [self.producer.get(i) for i in node.input]
            neighbours += [c.name for o in node.output for c in self.consumers.get(o, [])]
            for other in neighbours:
                if other in self.component:
                    self.touches.setdefault(self.component[other], set()).add(layer)

    def aliases(self) -> dict[str, str]:
        """Names ORT's optimized nodes of each layer may carry -> the layer: its node name, and (NCHWc layout) the
        output tensor of the layer or of the ReLU/Clip/Add fused into it."""
        names = {}
        for layer in self.layers:
            names[layer] = layer
            out = self.nodes[layer].output[0]
            for _ in range(3):
                names[out] = layer
                users = self.consumers.get(out, [])
                if len(users) != 1 or users[0].op_type not in ("Relu", "Clip", "Add"):
                    break
                out = users[0].output[0]
        return names

    def activation_pairs(self) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
        """(QuantizeLinear, DequantizeLinear) pairs on activations."""
        pairs = []
        for n in self.proto.graph.node:
            src = self.nodes.get(self.producer.get(n.input[0], "")) if n.op_type == "DequantizeLinear" else None
            if src is not None and src.op_type == "QuantizeLinear":
                pairs.append((src, n))
        return pairs

    def removable_pairs(self, floated: set[str]) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
        """The activation pairs that go when the layers ``floated`` run in float."""
        everything = floated >= set(self.layers)
        pairs = self.activation_pairs()

        def free(dq: onnx.NodeProto) -> bool:
            touched = self.touches.get(self.component[dq.name], set())
            return everything or (bool(touched) and touched <= floated)

        blocked = {quantizer_of(q) for q, dq in pairs if not free(dq)}
        return [(q, dq) for q, dq in pairs if quantizer_of(q) not in blocked]


def _dequantized(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    q = inits[node.input[0]].astype(np.float64)
    scale = inits[node.input[1]].astype(np.float64)
    zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if np.ndim(zero) else zero
    return ((q - zero) * scale).astype(np.float32)


def _float_dynamic_matmuls(g: OnnxGraph, inits: dict[str, np.ndarray]) -> None:
    """The dynamic Linears written out at export (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) become
    float MatMuls of the unquantized input and the dequantized weight."""
    producer, consumers = g.producer, g.consumers  # as the graph was before these rewrites

    def one(name: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    for node in [n for n in g.graph.node if n.op_type == "MatMulInteger"]:
        quant = producer.get(node.input[0])
        cast = one(node.output[0], "Cast")
        rescale = one(cast.output[0], "Mul") if cast is not None else None
        product = producer.get(rescale.input[1]) if rescale is not None else None
        scale = inits.get(product.input[1]) if product is not None and product.op_type == "Mul" else None
        zero = inits.get(node.input[3]) if len(node.input) > 3 else None
        if quant is None or quant.op_type != "DynamicQuantizeLinear" or scale is None or zero is None \
                or node.input[1] not in inits:
            continue
        weight = ((inits[node.input[1]].astype(np.float64) - zero) * scale).astype(np.float32)
        g.add_initializer(weight, f"{node.input[1]}_float")
        at = list(g.graph.node).index(node)
        g.remove(rescale)
        g.insert(at, [onnx.helper.make_node("MatMul", [quant.input[0], f"{node.input[1]}_float"],
                                            [rescale.output[0]], name=f"{node.name}_float")])


def with_float_layers(proto: onnx.ModelProto, floated: set[str] | None = None) -> tuple[onnx.ModelProto, set[str]]:
    """``proto`` with the layers ``floated`` (node names; None: all) in float, and the quantizer modules whose
    Q/DQ nodes were removed (weight quantizers included; an int32 bias's DQ is made at export, by no module)."""
    twin = standard_form(proto)
    regions = RegionGraph(twin)
    everything = floated is None or floated >= set(regions.layers)
    floated = set(regions.layers) if floated is None else floated
    g = OnnxGraph(twin)
    graph = twin.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    if everything:
        _float_dynamic_matmuls(g, inits)
        g.prune()
    nodes = {n.name: n for n in graph.node}
    removed: set[str] = set()
    consumers = {name: {n.name for n in users} for name, users in g.consumers.items()}
    for name in regions.constant_dq:  # weights and biases of float layers become float initializers
        node = nodes[name]
        users = {regions.weight_path.get(u, u) for u in consumers.get(node.output[0], set())}
        if users and (users <= floated or everything):
            g.add_initializer(_dequantized(node, inits), node.output[0])
            g.remove(node)
            if inits[node.input[0]].dtype != np.int32:  # an int32 bias is made at export: no module of its own
                removed.add(quantizer_of(node))
    rename: dict[str, str] = {}
    for q, dq in regions.removable_pairs(floated):
        rename[dq.output[0]] = q.input[0]
        if dq.name in nodes:
            graph.node.remove(nodes[dq.name])
        removed.add(quantizer_of(q))

    def source(name: str) -> str:  # back through chains of bypassed pairs (Q -> DQ -> Q -> DQ)
        while name in rename:
            name = rename[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = source(name)
    for out in graph.output:
        if out.name in rename:  # a graph output keeps its name: an Identity stands where the DQ was
            graph.node.append(onnx.helper.make_node("Identity", [source(out.name)], [out.name]))
    g.changed()
    g.prune()
    used = g.read()
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    integer_to_float_matmuls(twin)  # the Linears that stay int8 with a float output: fused again
    return twin, removed


def standard_form(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` in plain QDQ form (MatMulIntegerToFloat written back as DQ -> MatMul), whose weighted
    ops are the layers."""
    twin = copy.deepcopy(proto)
    unfuse_integer_matmuls(twin)
    return twin
