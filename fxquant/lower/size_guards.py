"""Input-size conditions checked inside the exported ONNX graph, so ONNX Runtime raises where the capture does.

A captured model holds only for inputs that satisfy its conditions on sizes (``fxquant.capture.shapes``: a
branch on ``x.shape[1]``, transformers' ``q_length > 1``, a maximum length). The torch model raises
``InputShapeError`` outside them; ONNX has no assert op, so ``guard_sizes`` computes each condition from the
inputs' ``Shape`` and routes every graph output through one ``Reshape`` per condition, whose target is the
output's shape with a trailing 1 when the condition holds and invalid (-2) when it does not, then back to its
shape. ORT then fails at run time with the node's name, which states the condition and the model line behind it,
instead of computing another path's function. Where the conditions hold the outputs are unchanged.

Conditions are torch.export's guard code (``L['x'].size()[1] > 6``); the translation covers integer arithmetic
(+, -, *, //, %, min, max), comparisons and and/or/not. A condition outside that subset is returned unguarded.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fxquant.lower.graph import OnnxGraph

PREFIX = "fxquant_size_check"
_COMPARE = {ast.Lt: "Less", ast.LtE: "LessOrEqual", ast.Gt: "Greater", ast.GtE: "GreaterOrEqual",
            ast.Eq: "Equal"}
_ARITH = {ast.Add: "Add", ast.Sub: "Sub", ast.Mult: "Mul"}


class _Untranslatable(Exception):
    pass


class _Builder:
    """Appends the nodes computing one condition; ``inputs``: forward argument name -> ONNX input name."""

    def __init__(self, inputs: dict[str, str], tag: str) -> None:
        self.inputs, self.tag, self.nodes, self.consts, self.k = inputs, tag, [], [], 0

    def _name(self) -> str:
        self.k += 1
        return f"{PREFIX}/{self.tag}/{self.k}"

    def op(self, op_type: str, *args: str, **attrs: object) -> str:
        out = self._name()
        self.nodes.append(helper.make_node(op_type, list(args), [out], name=out, **attrs))
        return out

    def const(self, value: int | bool) -> str:
        name = self._name()
        dtype = np.bool_ if isinstance(value, bool) else np.int64
        self.consts.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def value(self, node: ast.AST) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int)):
            return self.const(node.value)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            return self._size(node)
        if isinstance(node, ast.BoolOp):
            out = self.value(node.values[0])
            for other in node.values[1:]:
                out = self.op("And" if isinstance(node.op, ast.And) else "Or", out, self.value(other))
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self.op("Not", self.value(node.operand))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return self.op("Neg", self.value(node.operand))
        if isinstance(node, ast.Compare):
            parts, left = [], self.value(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.value(right_node)
                if isinstance(op, ast.NotEq):
                    parts.append(self.op("Not", self.op("Equal", left, right)))
                elif type(op) in _COMPARE:
                    parts.append(self.op(_COMPARE[type(op)], left, right))
                else:
                    raise _Untranslatable(type(op).__name__)
                left = right
            out = parts[0]
            for part in parts[1:]:
                out = self.op("And", out, part)
            return out
        if isinstance(node, ast.BinOp):
            a, b = self.value(node.left), self.value(node.right)
            if type(node.op) in _ARITH:
                return self.op(_ARITH[type(node.op)], a, b)
            if isinstance(node.op, ast.Mod):  # Python's sign rule (the divisor's), as ONNX Mod with fmod=0
                return self.op("Mod", a, b, fmod=0)
            if isinstance(node.op, ast.FloorDiv):  # exact floor division: (a - a mod b) / b divides evenly
                return self.op("Div", self.op("Sub", a, self.op("Mod", a, b, fmod=0)), b)
            raise _Untranslatable(type(node.op).__name__)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max") \
                and len(node.args) >= 2 and not node.keywords:
            return self.op("Min" if node.func.id == "min" else "Max", *(self.value(a) for a in node.args))
        raise _Untranslatable(ast.dump(node)[:80])

    def _size(self, node: ast.Subscript) -> str:
        """``L['name'].size()[axis]`` (or ``name.size()[axis]``): Gather(Shape(input), axis), a scalar int64."""
        call = node.value
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "size"
                and not call.args and isinstance(node.slice.value, int)):
            raise _Untranslatable(ast.dump(node)[:80])
        owner = call.func.value
        if isinstance(owner, ast.Subscript) and isinstance(owner.slice, ast.Constant):
            name = owner.slice.value
        elif isinstance(owner, ast.Name):
            name = owner.id
        else:
            raise _Untranslatable(ast.dump(owner)[:80])
        if name not in self.inputs:
            raise _Untranslatable(f"input {name!r}")
        shape = self.op("Shape", self.inputs[name])
        return self.op("Gather", shape, self.const(int(node.slice.value)), axis=0)


def guard_sizes(proto: onnx.ModelProto, conditions: Iterable[tuple[str, str]], names: list[str]
                ) -> list[tuple[str, str]]:
    """Check each (condition code, description) on the graph's inputs (``names``: the forward argument name of each
    ONNX graph input, in order) before every graph output; returns those it could not translate (the graph is
    left without them). ``proto`` is edited in place."""
    graph = proto.graph
    inputs = {n: i.name for n, i in zip(names, graph.input, strict=False)}
    checks, left = [], []
    for k, (code, text) in enumerate(conditions):
        builder = _Builder(inputs, f"c{k}")
        try:
            ok = builder.value(ast.parse(code, mode="eval").body)
        except (_Untranslatable, SyntaxError):
            left.append((code, text))
            continue
        checks.append((builder, ok, text))
    if not checks:
        return left
    g = OnnxGraph(proto)
    for builder, _, _ in checks:
        g.graph.node.extend(builder.nodes)
        g.graph.initializer.extend(builder.consts)
    invalid = g.add_initializer(np.array([-2], np.int64), f"{PREFIX}/invalid")
    one = g.add_initializer(np.array([1], np.int64), f"{PREFIX}/one")
    for j, output in enumerate(g.graph.output):
        producer = g.producer.get(output.name)
        if producer is None:
            continue  # an input or a constant returned as it is: nothing computed, nothing to check
        current = f"{PREFIX}/out{j}/unchecked"
        producer.output[list(producer.output).index(output.name)] = current
        g.replace_input(output.name, current)
        shape = _node(g, "Shape", [current], f"{PREFIX}/out{j}/shape")
        # one axis more than the output has, so the invalid target fails at any rank (a scalar output too)
        longer = _node(g, "Concat", [shape, one], f"{PREFIX}/out{j}/shape_and_1", axis=0)
        for i, (_, ok, text) in enumerate(checks):
            target = _node(g, "Where", [ok, longer, invalid], f"{PREFIX}/out{j}/c{i}/target")
            current = _node(g, "Reshape", [current, target], f"{PREFIX}/out{j}/c{i}/checked",
                            name=f"{PREFIX}: the model was captured for inputs where {text}; these inputs are not "
                                 f"({j}.{i})")
        _node(g, "Reshape", [current, shape], output.name, name=f"{PREFIX}/out{j}/restore")
    return left


def _node(g: OnnxGraph, op_type: str, inputs: list[str], output: str, name: str | None = None,
          **attrs: object) -> str:
    """Append one node computing tensor ``output`` (named ``name``, or after its output); returns ``output``."""
    g.graph.node.append(helper.make_node(op_type, inputs, [output], name=name or output, **attrs))
    g.changed()
    return output
