"""The fuzz generator's ops and the hypothesis strategy ``programs()`` (models: tests/fuzz_graphs.py).

Each op function draws one step (or a few) onto a ``Builder``. What users write is in it: in-place ops whose result
is assigned (``y = y.relu_()``, ``y += z``) or not (``y.relu_()``, ``F.relu(y, inplace=True)``, an
``nn.ReLU(inplace=True)`` called for its effect: the step's value is then the tensor it changed), sometimes through
a view; LayerNorm and Linear modules used at several places and Linear weights tied to another Linear's;
per-channel scales with outlier channels (what SmoothQuant and the outlier split act on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import strategies as st
from torch import nn

from tests.fuzz_graphs import ACTIVATIONS, BATCH, MAX_CHANNELS, MAX_STEPS, Builder, Program, Shape, Step


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
    same_input = [n for n, m in b.program.modules.items() if isinstance(m, nn.Linear) and m.in_features == fin]
    how = b.draw(st.sampled_from(("module", "module", "function", "tied")))
    if how == "tied" and same_input:  # a tie: F.linear on a module's weight, or a new module sharing it
        name = b.draw(st.sampled_from(same_input))
        out = b.program.modules[name].out_features
        if b.draw(st.booleans()):
            b.add(Step("linear", (i,), "tied", module=name), (*b.shapes[i][:-1], out))
            return
        tied = nn.Linear(fin, out)
        tied.weight = b.program.modules[name].weight
        tied.bias.data = b.tensor(out, scale=0.1)
        b.program.modules[new := b.new_name("fc")] = tied.eval()
        b.add(Step("linear", (i,), "module", new), (*b.shapes[i][:-1], out))
    elif how != "function":
        shared = [n for n in same_input if b.program.modules[n].out_features == fout]
        name = b.draw(st.sampled_from(shared)) if shared and b.draw(st.booleans()) else \
            b.module("fc", nn.Linear(fin, fout, bias=b.draw(st.booleans())))
        b.add(Step("linear", (i,), "module", name), shape)
    else:
        b.add(Step("linear", (i,), "function", param=b.param("w", b.tensor(fout, fin, scale=fin ** -0.5))), shape)


def _layer_norm(b: Builder) -> None:
    """A LayerNorm module over the last dim, sometimes one already used elsewhere (a shared norm)."""
    i = b.pick(b.live(_normable))
    width = b.shapes[i][-1]
    shared = [n for n, m in b.program.modules.items() if isinstance(m, nn.LayerNorm) and m.normalized_shape[0] == width]
    if shared and b.draw(st.booleans()):
        name = b.draw(st.sampled_from(shared))
    else:
        name = b.module("norm", nn.LayerNorm(width))
        norm = b.program.modules[name]
        norm.weight.data, norm.bias.data = b.tensor(width, scale=0.5, positive=True), b.tensor(width, scale=0.2)
    b.add(Step("layer_norm", (i,), "module", name), b.shapes[i])


def _normable(s: Shape) -> bool:
    return len(s) in (2, 3) and 2 <= s[-1] <= 64


def _outliers(b: Builder) -> None:
    """Multiply by a per-feature scale with one or two channels far above the rest (massive activations)."""
    i = b.pick(b.live(lambda s: len(s) >= 2))
    s = b.shapes[i]
    width = s[1] if len(s) == 4 else s[-1]
    scale = torch.ones(width)
    for c in b.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=2, unique=True)):
        scale[c] = b.draw(st.sampled_from((12.0, 30.0)))
    shape = (width, 1, 1) if len(s) == 4 else (width,)
    b.add(Step("mul", (i,), "function", param=b.param("p", scale.reshape(shape))), s)


IN_PLACE_OPS = ("relu_", "F.relu(inplace)", "torch.relu_", "clamp_", "module", "add_", "mul_")


def _in_place(b: Builder) -> None:
    """An in-place op whose result is assigned (``y = y.relu_()``) or not (``y.relu_()``): the step's value is the
    tensor it changed, and the value it read is not read again (later steps read the step's)."""
    candidates = [i for i in b.live() if i != 0 and i not in b.views]  # the user's input is never changed
    if not candidates:
        return
    i = b.pick(candidates)
    s = b.shapes[i]
    op = b.draw(st.sampled_from(IN_PLACE_OPS))
    step = Step(op, (i,), "unassigned")
    if op == "module":
        relus = [n for n, m in b.program.modules.items() if isinstance(m, nn.ReLU) and m.inplace]
        name = relus[0] if relus and b.draw(st.booleans()) else b.module("act", nn.ReLU(inplace=True))
        step = Step(op, (i,), "unassigned", module=name)
    elif op in ("add_", "mul_"):
        other = b.draw(st.sampled_from(("value", "scalar", "parameter") if op == "add_" else ("scalar", "parameter")))
        if other == "value":
            step = Step(op, (i, b.pick(b.live(lambda t: t == s))), "unassigned")
        elif other == "scalar":
            step = Step(op, (i,), "unassigned", args=(b.draw(st.sampled_from((0.5, 2.0, -1.0))),))
        else:
            shape = (s[1], 1, 1) if len(s) == 4 else (s[-1],)
            step = Step(op, (i,), "unassigned", param=b.param("p", b.tensor(*shape, scale=0.5, positive=op == "mul_")))
    if len(s) >= 3 and b.draw(st.integers(0, 3)) == 0:  # through a view: torch.fx cannot keep it, capture must
        step = Step(f"view:{step.op}", step.inputs, step.form, step.module, step.param, step.args)
    if b.draw(st.booleans()) and op in ("relu_", "clamp_", "add_", "mul_") and not step.op.startswith("view:"):
        step = Step(op, step.inputs, "assigned", step.module, step.param, step.args)  # y = y.relu_()
    b.add(step, s)


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
    "layer_norm": (_layer_norm, _normable),
    "outliers": (_outliers, lambda s: len(s) >= 2),
    "in_place": (_in_place, lambda s: True),
}

WEIGHTS = {"conv": 3, "activation": 2, "binary": 2, "in_place": 2}  # how much more often than the other ops


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
