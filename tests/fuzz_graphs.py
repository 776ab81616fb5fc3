"""Random small models for the fuzz test: a program of op records that a real nn.Module interprets.

A ``Program`` is a list of ``Step`` records over a list of values (value 0 is the model input; step i appends
value i + 1). ``FuzzModel`` runs it in ``forward``, so torch.fx traces the unrolled program: module steps
become ``call_module`` nodes (a module named by several steps is shared), functional steps ``call_function``
nodes reading the model's parameters through ``get_attr``, method steps ``call_method`` nodes.
``programs()`` is the hypothesis strategy; ``print(program)`` shows it as Python-like lines.
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
        if form == "module":
            return self.mods[step.module](*xs)
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
        if step.op in ("reshape", "flatten", "permute") or step.form == "inplace":
            self.views.add(len(self.shapes) - 1)
        if step.form == "inplace":
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


def _image(s: Shape) -> bool:
    return len(s) == 4 and s[1] <= MAX_CHANNELS


def _conv(b: Builder) -> None:
    i = b.pick(b.live(_image))
    _, c, h, w = b.shapes[i]
    shared = [n for n, m in b.program.modules.items() if isinstance(m, nn.Conv2d) and m.in_channels == c]
    if shared and b.draw(st.booleans()):  # call an existing conv again: a shared (reused) module
        m = b.program.modules[(name := b.draw(st.sampled_from(shared)))]
        out = b.add(Step("conv", (i,), "module", name), _conv_shape(b.shapes[i], m.out_channels, m.kernel_size[0],
                                                                    m.stride[0], m.padding[0]))
    else:
        k = b.draw(st.sampled_from((1, 3))) if min(h, w) >= 3 else 1
        stride = b.draw(st.sampled_from((1, 2))) if min(h, w) >= 4 else 1
        style, cout = b.draw(st.sampled_from(("plain", "depthwise", "grouped"))), b.draw(st.sampled_from((2, 4, 8)))
        groups = 1
        if style == "depthwise":
            groups, cout = c, c * b.draw(st.sampled_from((1, 2)))
        elif style == "grouped" and c % 2 == 0:
            groups = 2
        bias = b.draw(st.booleans())
        shape = _conv_shape(b.shapes[i], cout, k, stride, k // 2)
        if b.draw(st.booleans()):
            name = b.module("conv", nn.Conv2d(c, cout, k, stride, k // 2, groups=groups, bias=bias))
            out = b.add(Step("conv", (i,), "module", name), shape)
        else:
            w_name = b.param("w", b.tensor(cout, c // groups, k, k, scale=(c // groups * k * k) ** -0.5))
            if bias:
                b.program.params[w_name + "_bias"] = b.tensor(cout, scale=0.1)
            out = b.add(Step("conv", (i,), "function", param=w_name, args=(stride, k // 2, groups)), shape)
    if b.draw(st.booleans()):  # BatchNorm after the conv (folded by prepare)
        b.add(Step("batch_norm", (out,), "module", b.module("bn", nn.BatchNorm2d(b.shapes[out][1]))), b.shapes[out])


def _conv_shape(s: Shape, cout: int, k: int, stride: int, pad: int) -> Shape:
    return (s[0], cout, (s[2] + 2 * pad - k) // stride + 1, (s[3] + 2 * pad - k) // stride + 1)


def _linear(b: Builder) -> None:
    i = b.pick(b.live(lambda s: len(s) in (2, 3, 4) and s[-1] <= 256))
    fin, fout = b.shapes[i][-1], b.draw(st.sampled_from((2, 4, 8)))
    shape = (*b.shapes[i][:-1], fout)
    if b.draw(st.booleans()):
        shared = [n for n, m in b.program.modules.items()
                  if isinstance(m, nn.Linear) and m.in_features == fin and m.out_features == fout]
        name = b.draw(st.sampled_from(shared)) if shared and b.draw(st.booleans()) else \
            b.module("fc", nn.Linear(fin, fout, bias=b.draw(st.booleans())))
        b.add(Step("linear", (i,), "module", name), shape)
    else:
        b.add(Step("linear", (i,), "function", param=b.param("w", b.tensor(fout, fin, scale=fin ** -0.5))), shape)


def _matmul(b: Builder) -> None:
    i = b.pick(b.live(lambda s: len(s) in (3, 4)))
    s = b.shapes[i]
    form = b.draw(st.sampled_from(("function", "operator")))
    if b.draw(st.booleans()):  # x @ W with a parameter W (a linear layer written as matmul)
        m = b.draw(st.sampled_from((2, 4, 8)))
        w = b.param("w", b.tensor(s[-1], m, scale=s[-1] ** -0.5))
        b.add(Step("matmul", (i,), form, param=w), (*s[:-1], m))
        return
    j = b.pick(b.live(lambda t: t == s))  # attention-like: x @ y^T
    dims = (len(s) - 2, len(s) - 1)
    yt = b.add(Step("permute", (j,), "function", args=dims), (*s[:-2], s[-1], s[-2]))
    b.add(Step("matmul", (i, yt), form), (*s[:-1], s[-2]))


def _binary(b: Builder) -> None:
    op = b.draw(st.sampled_from(("add", "mul")))
    i = b.pick(b.live())
    s = b.shapes[i]
    form = b.draw(st.sampled_from(("function", "operator", "method", "inplace")))
    if form == "inplace" and not b.can_overwrite(i):
        form = "operator"
    other = b.draw(st.sampled_from(("value", "scalar", "parameter")))
    if other == "value":  # the other value may be i itself (x + x); with an earlier value: a residual
        step = Step(op, (i, b.pick(b.live(lambda t: t == s))), form)
    elif other == "scalar":
        step = Step(op, (i,), form, args=(b.draw(st.sampled_from((0.5, 2.0, -1.0))),))
    else:  # per-channel (images) or per-feature scale/shift: a layer scale or a learned bias
        shape = (s[1], 1, 1) if len(s) == 4 else (s[-1],)
        step = Step(op, (i,), form, param=b.param("p", b.tensor(*shape, scale=0.5, positive=op == "mul")))
    b.add(step, s)


def _cat(b: Builder) -> None:
    i = b.pick(b.live(lambda s: len(s) >= 2))
    s = b.shapes[i]
    dim = b.draw(st.sampled_from(range(1, len(s))))
    fits = b.live(lambda t: len(t) == len(s) and all(t[d] == s[d] for d in range(len(s)) if d != dim))
    others = [b.pick(fits) for _ in range(b.draw(st.integers(1, 2)))]
    size = s[dim] + sum(b.shapes[j][dim] for j in others)
    if size > 64:
        return
    b.add(Step("cat", (i, *others), args=(dim,)), tuple(size if d == dim else n for d, n in enumerate(s)))


def _pool(b: Builder) -> None:
    i = b.pick(b.live(lambda s: len(s) == 4 and min(s[2:]) >= 2))
    n, c, h, w = b.shapes[i]
    kind = b.draw(st.sampled_from(("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "mean")))
    if kind == "mean":
        b.add(Step("mean", (i,), "method"), (n, c, 1, 1))
        return
    size = b.draw(st.sampled_from((1, 2))) if kind.startswith("adaptive") else 2
    shape = (n, c, size, size) if kind.startswith("adaptive") else (n, c, h // 2, w // 2)
    if b.draw(st.booleans()):
        cls = {"max_pool": nn.MaxPool2d, "avg_pool": nn.AvgPool2d, "adaptive_avg_pool": nn.AdaptiveAvgPool2d,
               "adaptive_max_pool": nn.AdaptiveMaxPool2d}[kind]
        b.add(Step(kind, (i,), "module", b.module("pool", cls(size))), shape)
    else:
        b.add(Step(kind, (i,), args=(size,)), shape)


def _activation(b: Builder) -> None:
    i = b.pick(b.live())
    act = b.draw(st.sampled_from(ACTIVATIONS))
    form = b.draw(st.sampled_from(("module", "function", "method") if act in ("relu", "sigmoid") else
                                  ("module", "function")))
    if form == "module":
        cls = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
               "hardswish": nn.Hardswish}[act]
        shared = [n for n, m in b.program.modules.items() if type(m) is cls]  # one self.relu called everywhere
        name = shared[0] if shared and b.draw(st.booleans()) else b.module("act", cls())
        b.add(Step(act, (i,), "module", name), b.shapes[i])
    else:
        b.add(Step(act, (i,), form), b.shapes[i])


def _reshape(b: Builder) -> None:
    i = b.pick(b.live(lambda s: len(s) >= 2))
    s = b.shapes[i]
    how = b.draw(st.sampled_from(("flatten", "reshape")))
    if how == "flatten" and len(s) > 2:
        start = b.draw(st.integers(1, len(s) - 2))
        flat = 1
        for d in s[start:]:
            flat *= d
        shape = (*s[:start], flat)
        if b.draw(st.booleans()) and start == 1:
            b.add(Step("flatten", (i,), "module", b.module("flat", nn.Flatten())), shape)
        else:
            b.add(Step("flatten", (i,), args=(start,)), shape)
        return
    total = 1
    for d in s[1:]:
        total *= d
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    inner = b.draw(st.sampled_from(divisors))
    new = (total // inner, inner) if b.draw(st.booleans()) else (total,)
    b.add(Step("reshape", (i,), "method", args=new), (s[0], *new))


def _permute(b: Builder) -> None:
    i = b.pick(b.live(lambda s: len(s) >= 3))
    s = b.shapes[i]
    if len(s) == 4 and b.draw(st.booleans()):  # NCHW -> NHWC (then a linear acts per pixel) or H <-> W
        order = b.draw(st.sampled_from(((0, 2, 3, 1), (0, 1, 3, 2), (0, 3, 1, 2))))
        b.add(Step("permute", (i,), "method", args=order), tuple(s[d] for d in order))
        return
    d0, d1 = b.draw(st.sampled_from([(a, c) for a in range(1, len(s)) for c in range(a + 1, len(s))]))
    shape = list(s)
    shape[d0], shape[d1] = s[d1], s[d0]
    b.add(Step("permute", (i,), "function", args=(d0, d1)), tuple(shape))


def _batch_norm(b: Builder) -> None:
    i = b.pick(b.live(_image))
    b.add(Step("batch_norm", (i,), "module", b.module("bn", nn.BatchNorm2d(b.shapes[i][1]))), b.shapes[i])


OPS: dict[str, tuple[Callable[[Builder], None], Callable[[Shape], bool]]] = {
    "conv": (_conv, _image),
    "linear": (_linear, lambda s: len(s) in (2, 3, 4) and s[-1] <= 256),
    "matmul": (_matmul, lambda s: len(s) in (3, 4)),
    "binary": (_binary, lambda s: True),
    "cat": (_cat, lambda s: len(s) >= 2),
    "pool": (_pool, lambda s: len(s) == 4 and min(s[2:]) >= 2),
    "activation": (_activation, lambda s: True),
    "reshape": (_reshape, lambda s: len(s) >= 2),
    "permute": (_permute, lambda s: len(s) >= 3),
    "batch_norm": (_batch_norm, _image),
}

WEIGHTS = {"conv": 3, "activation": 2, "binary": 2}  # how much more often than the other ops


@st.composite
def programs(draw: st.DrawFn, max_steps: int = MAX_STEPS) -> Program:
    """A random program: an input (image, sequence or feature vector) and 1..max_steps ops on it."""
    input_shape = draw(st.sampled_from([(BATCH, 3, 8, 8), (BATCH, 4, 6, 6), (BATCH, 2, 5, 5), (BATCH, 6, 8),
                                        (BATCH, 12)]))
    b = Builder(draw, input_shape, draw(st.integers(0, 2**16)))
    for _ in range(draw(st.integers(1, max_steps))):
        possible = [name for name, (_, ok) in OPS.items() for _ in range(WEIGHTS.get(name, 1)) if b.live(ok)]
        OPS[draw(st.sampled_from(possible))][0](b)
    b.program.outputs = tuple(i for i in range(1, len(b.shapes)) if i not in b.used)
    return b.program
