"""One view of an ONNX graph for every ONNX-level pass (as ``fxquant.rules.pattern.GraphView`` is for FX graphs).

``OnnxGraph(proto)`` answers who produces and who reads each tensor, what initializers and constants hold, and
makes the edits the passes share: splice a node's replacement in its place, point readers of one tensor at
another, add initializers, drop what nothing reads. The maps are computed on first use and recomputed after an
edit made through the view; a pass that edits nodes directly (``node.input[i] = ...``) and then needs the new
maps calls ``changed()``. A pass that reads the maps once and edits as it goes sees them as they were when it
started, which is what most rewrites want (the nodes they match are not the ones they add).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})  # ONNX ops that multiply by a weight
EIGHT_BIT = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)  # the codes ORT's integer matmuls take


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """One attribute of a node as a Python value, or ``default``."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class OnnxGraph:
    """Producer, consumers, initializers and constants of ``proto.graph``, and the edits passes make to it."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.graph = proto.graph
        self._producer: dict[str, onnx.NodeProto] | None = None
        self._consumers: dict[str, list[onnx.NodeProto]] | None = None
        self._initializers: dict[str, onnx.TensorProto] | None = None

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def producer(self) -> dict[str, onnx.NodeProto]:
        """Tensor name -> the node that writes it."""
        if self._producer is None:
            self._producer = {o: n for n in self.graph.node for o in n.output}
        return self._producer

    @property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """Tensor name -> the nodes that read it, once per input slot (a node reading it twice is listed twice)."""
        if self._consumers is None:
            found: dict[str, list[onnx.NodeProto]] = {}
            for node in self.graph.node:
                for name in node.input:
                    found.setdefault(name, []).append(node)
            self._consumers = found
        return self._consumers

    @property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        """Initializer name -> its TensorProto."""
        if self._initializers is None:
            self._initializers = {t.name: t for t in self.graph.initializer}
        return self._initializers

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def sole(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, when there is exactly one and it is an ``op_type``."""
        found = self.users(name)
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    def made_by(self, name: str, op_type: str, single_use: bool = False) -> onnx.NodeProto | None:
        """The ``op_type`` node that writes ``name`` (with ``single_use``: only when nothing else reads it)."""
        node = self.producer.get(name)
        ok = node is not None and node.op_type == op_type and (not single_use or len(self.users(name)) == 1)
        return node if ok else None

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name``, or None."""
        init = self.initializers.get(name)
        return numpy_helper.to_array(init) if init is not None else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a Constant node's tensor-valued ``value`` output, else None."""
        if name in self.initializers:
            return self.array(name)
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        value = next((a for a in node.attribute if a.name == "value"), None)
        return numpy_helper.to_array(value.t) if value is not None else None

    def linear_weight(self, node: onnx.NodeProto) -> tuple[onnx.NodeProto, bool] | None:
        """For a MatMul/Gemm whose weight is a DequantizeLinear of 2-D initializers (a MatMul's through a
        Transpose): that DequantizeLinear, and whether the weight is already (K, N) (else (N, K), transposed by
        the op). None for any other MatMul/Gemm."""
        if node.op_type == "Gemm":
            a = attrs(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                return None
            dq, transposed = self.producer.get(node.input[1]), bool(a.get("transB", 0))
        else:
            t = self.producer.get(node.input[1])
            if t is None or t.op_type != "Transpose" or list(attrs(t).get("perm", [1, 0])) != [1, 0]:
                return None
            dq, transposed = self.producer.get(t.input[0]), True
        if dq is None or dq.op_type != "DequantizeLinear" or any(i not in self.initializers for i in dq.input[:3]):
            return None
        if self.array(dq.input[0]).ndim != 2:
            return None
        return dq, transposed

    def column_weighted_linears(self) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto, bool]]:
        """Each MatMul/Gemm whose 8-bit weight ``linear_weight`` finds with one scale per tensor or per output
        column, in graph order over the nodes as they were when iteration began (a pass may splice as it goes):
        (node, the weight's DequantizeLinear, whether the weight is (N, K)). A 16-bit weight is left out: ORT has
        no integer matmul for it, so its QDQ form runs (dequantized)."""
        for node in list(self.graph.node):
            found = self.linear_weight(node) if node.op_type in ("MatMul", "Gemm") else None
            if found is None or self.initializers[found[0].input[0]].data_type not in EIGHT_BIT:
                continue
            dq, transposed = found
            if self.array(dq.input[1]).ndim and attr(dq, "axis", 1) % 2 != (0 if transposed else 1):
                continue  # per-channel along the reduced axis: not a per-column scale
            yield node, dq, transposed

    def outputs(self) -> set[str]:
        """The graph's output names."""
        return {o.name for o in self.graph.output}

    def shapes(self) -> dict[str, list[int | None]]:
        """Every typed tensor's shape from ONNX shape inference (None for a symbolic dimension)."""
        inferred = onnx.shape_inference.infer_shapes(self.proto)
        typed = (*inferred.graph.value_info, *inferred.graph.input)
        return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in typed if v.type.tensor_type.HasField("shape")}

    # ---- editing ------------------------------------------------------------------------------------
    def changed(self) -> None:
        """Forget the maps: the next read recomputes them from the graph."""
        self._producer = self._consumers = self._initializers = None

    def add_initializer(self, value: np.ndarray, name: str) -> str:
        """Add ``value`` as initializer ``name``; returns the name."""
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.changed()
        return name

    def remove_initializer(self, name: str) -> None:
        for init in [t for t in self.graph.initializer if t.name == name]:
            self.graph.initializer.remove(init)
        self.changed()

    def insert(self, at: onnx.NodeProto | int, nodes: Iterable[onnx.NodeProto]) -> None:
        """Insert ``nodes`` in order before the node ``at`` (or at index ``at``)."""
        index = at if isinstance(at, int) else list(self.graph.node).index(at)
        for offset, node in enumerate(nodes):
            self.graph.node.insert(index + offset, node)
        self.changed()

    def remove(self, *nodes: onnx.NodeProto) -> None:
        for node in nodes:
            self.graph.node.remove(node)
        self.changed()

    def splice(self, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        """Replace ``node`` by the nodes ``new``, in its place in the graph's order."""
        at = list(self.graph.node).index(node)
        self.graph.node.remove(node)
        self.insert(at, new)

    def replace_input(self, old: str, new: str) -> None:
        """Every node that reads tensor ``old`` reads ``new`` instead."""
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        self.changed()

    def read(self) -> set[str]:
        """The tensors some node reads or the graph outputs."""
        return {i for n in self.graph.node for i in n.input} | self.outputs()

    def drop_unused(self, names: Iterable[str]) -> None:
        """Remove the initializers and Constant nodes among ``names`` that nothing reads any more."""
        for name in set(names) - self.read() - {""}:
            for init in [t for t in self.graph.initializer if t.name == name]:
                self.graph.initializer.remove(init)
            for node in [n for n in self.graph.node if n.op_type == "Constant" and n.output[0] == name]:
                self.graph.node.remove(node)
        self.changed()

    def prune(self) -> None:
        """Drop nodes none of whose outputs is read (Q/DQ and Transposes a rewrite left) and unused initializers."""
        graph = self.graph
        while True:
            used = self.read()
            dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
            if not dead:
                break
            for n in dead:
                graph.node.remove(n)
        used = {i for n in graph.node for i in n.input}
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
        self.changed()

    def use_domain(self, domain: str, version: int = 1) -> None:
        """Declare an operator-set domain (e.g. com.microsoft) the graph's new nodes use."""
        if not any(o.domain == domain for o in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid(domain, version))
