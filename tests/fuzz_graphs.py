"""Random small models for the fuzz test: a program of op records that a real nn.Module interprets.

A ``Program`` is a list of ``Step`` records over a list of values (value 0 is the model input; step i appends
value i + 1). ``FuzzModel`` runs it in ``forward``, so torch.fx traces the unrolled program: module steps
become ``call_module`` nodes (a module named by several steps is shared), functional steps ``call_function``
nodes reading the model's parameters through ``get_attr``, method steps ``call_method`` nodes.
``print(program)`` shows it as Python-like lines; ``Builder`` draws steps onto a program (the ops that draw are in
tests/fuzz_ops.py, with the hypothesis strategy ``programs()``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

BATCH = 2
MAX_CHANNELS = 16
MAX_STEPS = 8
ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "sigmoid", "hardswish")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One op: ``op`` applied to ``inputs`` (value indices). ``form`` is "module" (``module`` names the
    ModuleDict entry), "function" (``param`` names the weight/constant in the ParameterDict, if any),
    "method", "operator" or "inplace"; ``args`` are the op's static arguments."""

    op: str
    inputs: tuple[int, ...]
    form: str = "function"
    module: str | None = None
    param: str | None = None
    args: tuple = ()

    def __str__(self) -> str:
        what = self.module or self.param or ""
        extra = f", {self.args}" if self.args else ""
        return f"{self.op}[{self.form}{':' + what if what else ''}]({', '.join(f'v{i}' for i in self.inputs)}{extra})"


@dataclass
class Program:
    """Steps over a value list, the modules and parameters they use, and the values the model returns."""

    input_shape: Shape
    steps: list[Step] = field(default_factory=list)
    shapes: list[Shape] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: tuple[int, ...] = ()

    def __repr__(self) -> str:
        lines = [f"v0: input {self.input_shape}"]
        lines += [f"v{i + 1} = {s}  -> {self.shapes[i + 1]}" for i, s in enumerate(self.steps)]
        lines += [f"  {name} = {m}" for name, m in self.modules.items()]
        lines += [f"  {name}: parameter {tuple(p.shape)}" for name, p in self.params.items()]
        lines.append(f"return {', '.join(f'v{i}' for i in self.outputs)}")
        return "\n".join(lines)


FUNCTIONS: dict[str, Callable] = {
    "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish, "max_pool": F.max_pool2d, "avg_pool": F.avg_pool2d,
    "adaptive_avg_pool": F.adaptive_avg_pool2d, "adaptive_max_pool": F.adaptive_max_pool2d,
}


class FuzzModel(nn.Module):
    """Interprets a Program in ``forward``."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.steps = list(program.steps)
        self.outputs = program.outputs
        self.mods = nn.ModuleDict(program.modules)
        self.params = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in program.params.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = [x]
        for step in self.steps:
            values.append(self.run(step, [values[i] for i in step.inputs]))
        outs = tuple(values[i] for i in self.outputs)
        return outs[0] if len(outs) == 1 else outs

    def run(self, step: Step, xs: list[torch.Tensor]) -> torch.Tensor:
        op, form, a = step.op, step.form, step.args
        if form == "unassigned":
            self._in_place(step, xs)
            return xs[0]
        if form == "assigned":  # y = y.relu_(): the in-place op's own result
            return self._in_place(step, xs)
        if form == "module":
            return self.mods[step.module](*xs)
        if form == "tied":
            return F.linear(xs[0], self.mods[step.module].weight)
        if op == "conv":
            stride, padding, groups = a
            bias = self.params[step.param + "_bias"] if step.param + "_bias" in self.params else None
            return F.conv2d(xs[0], self.params[step.param], bias, stride, padding, 1, groups)
        if op == "linear":
            return F.linear(xs[0], self.params[step.param])
        if op == "matmul":
            other = self.params[step.param] if step.param else xs[1]
            return torch.matmul(xs[0], other) if form == "function" else xs[0] @ other
        if op in ("add", "mul"):
            return self._binary(step, xs)
        if op == "cat":
            return torch.cat(xs, dim=a[0])
        if op in ("flatten", "reshape"):
            return torch.flatten(xs[0], a[0]) if op == "flatten" else xs[0].reshape(-1, *a)
        if op == "permute":
            return xs[0].permute(*a) if form == "method" else torch.transpose(xs[0], *a)
        if op == "mean":
            return xs[0].mean((2, 3), keepdim=True)
        if form == "method":
            return getattr(xs[0], op)()
        return FUNCTIONS[op](xs[0], *a)

    def _in_place(self, step: Step, xs: list[torch.Tensor]) -> torch.Tensor:
        """An in-place op ("view:" ops act through a flat view of the value); returns the op's result."""
        op = step.op.removeprefix("view:")
        x = xs[0].flatten(1) if step.op.startswith("view:") else xs[0]
        other = self.params[step.param] if step.param else xs[1] if len(xs) > 1 else None
        if op == "relu_":
            return x.relu_()
        if op == "F.relu(inplace)":
            return F.relu(x, inplace=True)
        if op == "torch.relu_":
            return torch.relu_(x)
        if op == "clamp_":
            return x.clamp_(min=0)
        if op == "module":
            return self.mods[step.module](x)
        if op == "add_":
            return x.add_(other if other is not None else step.args[0])
        if op == "mul_":
            return x.mul_(other if other is not None else step.args[0])
        raise ValueError(f"unknown in-place op {op}")

    def _binary(self, step: Step, xs: list[torch.Tensor]) -> torch.Tensor:
        a = xs[0]
        b = self.params[step.param] if step.param else xs[1] if len(xs) > 1 else step.args[0]
        if step.form == "inplace":
            if step.op == "add":
                a += b
            else:
                a *= b
            return a
        if step.form == "operator":
            return operator.add(a, b) if step.op == "add" else operator.mul(a, b)
        if step.form == "method":
            return a.add(b) if step.op == "add" else a.mul(b)
        return torch.add(a, b) if step.op == "add" else torch.mul(a, b)


# ---- the generator ----------------------------------------------------------------------------------------
class Builder:
    """Draws steps onto a Program, tracking shapes, consumed values, and values an in-place op overwrote."""

    def __init__(self, draw: st.DrawFn, input_shape: Shape, seed: int) -> None:
        self.draw = draw
        self.program = Program(input_shape, shapes=[input_shape])
        self.gen = torch.Generator().manual_seed(seed)
        self.used: set[int] = set()
        self.dead: set[int] = set()  # values an in-place op overwrote: later steps read its result instead
        self.views: set[int] = {0}  # the input and values that may share memory with another value

    @property
    def shapes(self) -> list[Shape]:
        return self.program.shapes

    def live(self, pred: Callable[[Shape], bool] = lambda s: True) -> list[int]:
        return [i for i, s in enumerate(self.shapes) if pred(s) and i not in self.dead]

    def pick(self, candidates: list[int]) -> int:
        """The newest candidate (a chain) or, half of the time, any candidate (a branch, a residual)."""
        back = self.draw(st.integers(0, len(candidates) - 1)) if self.draw(st.booleans()) else 0
        return candidates[-1 - back]

    def add(self, step: Step, shape: Shape) -> int:
        self.program.steps.append(step)
        self.shapes.append(shape)
        self.used.update(step.inputs)
        if step.op in ("reshape", "flatten", "permute") or step.form in ("inplace", "unassigned", "assigned"):
            self.views.add(len(self.shapes) - 1)
        if step.form in ("inplace", "unassigned", "assigned"):
            self.dead.add(step.inputs[0])
        return len(self.shapes) - 1

    def can_overwrite(self, i: int) -> bool:
        """In place only on a fresh value nothing read yet (as in ``out = conv(x); out += x``): no aliasing."""
        return i not in self.views and i not in self.used

    def new_name(self, prefix: str) -> str:
        return f"{prefix}{len(self.program.modules) + len(self.program.params)}"

    def tensor(self, *shape: int, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen) * scale
        return t.abs() + 0.5 if positive else t

    def module(self, prefix: str, m: nn.Module) -> str:
        name = self.new_name(prefix)
        for p in m.parameters():  # weights ~ 1/sqrt(fan_in): activations stay of order one
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.data = self.tensor(*p.shape, scale=fan_in ** -0.5)
        if isinstance(m, nn.BatchNorm2d):  # random statistics, so that folding matters
            c = m.num_features
            m.running_mean, m.running_var = self.tensor(c, scale=0.5), self.tensor(c, scale=0.5, positive=True)
            m.weight.data, m.bias.data = self.tensor(c, scale=0.5, positive=True), self.tensor(c, scale=0.3)
        self.program.modules[name] = m.eval()
        return name

    def param(self, prefix: str, t: torch.Tensor) -> str:
        name = self.new_name(prefix)
        self.program.params[name] = t
        return name
