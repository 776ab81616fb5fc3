"""The input sizes a captured model holds: its dynamic axes, and the conditions on sizes its capture follows.

torch.export records a graph for the sizes its example takes, generalized where the code allows: an axis stays
dynamic unless the code fixes it, and a branch on a size (``if x.shape[1] > 6:``, HF's ``query.shape[2] > 1``)
becomes a *guard* the inputs must satisfy for the graph to compute what the model computes. ``InputShapes``
keeps both: ``check`` runs first in every forward of the prepared and converted model (``check_inputs``,
called by the graph's own code) and raises ``InputShapeError`` naming the guard and the model line behind it,
so a captured model never computes another path's function; ``onnx_dims`` gives export_onnx the axes to keep
dynamic.

Users declare axes as torch.export does (``prepare(..., dynamic_shapes=...)``): one entry per example input (a
tuple, or a dict keyed by the forward's argument names), each a dict ``{axis: Dim}`` or a tuple with one entry
per axis (``torch.export.Dim("batch")``, ``Dim.AUTO``, ``Dim.DYNAMIC``, ``Dim.STATIC`` or None); axes not named
are static. ``declared_dims`` checks and normalizes such a declaration.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
from torch import fx
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.printers import PythonPrinter

from fxquant.errors import ConfigError, ConfigTypeError, InputShapeError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))

AxisSpec = object  # a torch.export Dim, Dim.AUTO / DYNAMIC / STATIC, or None
Declared = tuple[dict[int, AxisSpec] | None, ...]  # one entry per example input


@dataclass(frozen=True)
class InputShapes:
    """The forward's tensor inputs (``names``), the dynamic axes of each (``dims``: per input, ``(axis, dim
    name)`` pairs; inputs sharing a name share the size), the guards the inputs must satisfy (Python expressions
    over ``L['name'].size()[axis]``, as torch.export prints them) and where the model's code set them
    (``origins``: ``(condition, "file:line (`code`)")`` for each condition on sizes the model's code, not torch's,
    set)."""

    names: tuple[str, ...]
    dims: tuple[tuple[tuple[int, str], ...], ...]
    guards: tuple[str, ...] = ()
    conditions: tuple[tuple[str, str, str, bool], ...] = ()
    declared: bool = False  # the axes are the user's (prepare's dynamic_shapes): export keeps them or raises

    def check(self, given: Mapping[str, object]) -> None:
        """Raise InputShapeError when the inputs (forward argument name -> value) do not satisfy a guard."""
        if not self.guards:
            return
        tensors = {k: v for k, v in given.items() if k in self.names and isinstance(v, torch.Tensor)}
        if any(isinstance(d, torch.SymInt) for v in tensors.values() for d in v.shape):
            return  # traced with symbolic sizes (torch.export of the converted model): its own guards apply
        for guard in self.guards:
            if not _holds(guard, tensors):
                raise InputShapeError(self._message(guard, tensors))

    def _message(self, guard: str, tensors: dict[str, torch.Tensor]) -> str:
        sizes = ", ".join(f"{k}: {list(v.shape)}" for k, v in tensors.items())
        text, why = guard.replace("L['", "").replace("']", ""), ""
        failed = next(((t, site) for code, t, site, _ in self.conditions if not _holds(code, tensors)), None)
        if failed is not None:
            text, why = failed[0], f", a condition of the model's code at {failed[1]}" if failed[1] else ""
        return (f"this model was captured (torch.export) for inputs where `{text}`{why}, and these inputs "
                f"({sizes}) are not: its graph would compute another function than the model here. Call it "
                f"with inputs of the sizes it was captured for, or prepare it again with an example of the sizes "
                f"you run (or declare them: prepare(..., dynamic_shapes=...))")

    def unchecked(self) -> list[tuple[str, str, str, bool]]:
        """(code, condition, site, whether the user's own code set it, not an installed package's) of each
        condition on a size the ONNX export keeps dynamic: the exported graph holds only where it holds, and no
        runtime checks it unless the export adds the check (``fxquant.lower.size_guards``)."""
        dynamic = [f"{name}.size()[{axis}]" for name, axes in zip(self.names, self.dims, strict=False)
                   for axis, _ in axes]
        return [(code, text, site, own) for code, text, site, own in self.conditions
                if any(re.search(rf"(?<![\w.]){re.escape(d)}", text) for d in dynamic)]

    def onnx_dims(self) -> tuple[dict[int, Dim] | None, ...]:
        """torch.export ``dynamic_shapes`` for the ONNX export: one named Dim per dynamic size."""
        made: dict[str, Dim] = {}
        return tuple({axis: made.setdefault(name, Dim(name)) for axis, name in axes} or None for axes in self.dims)


_NAMESPACE = {**SYMPY_INTERP, "math": math, "inf": float("inf")}
_PRINTER = PythonPrinter()


@functools.lru_cache(maxsize=256)
def _compiled(guard: str) -> object:
    return compile(guard, "<fxquant guard>", "eval")


def _holds(guard: str, tensors: dict[str, torch.Tensor]) -> bool:
    try:
        return bool(eval(_compiled(guard), _NAMESPACE, {"L": tensors}))  # torch's own guard text, or ours
    except (KeyError, IndexError):  # an input left out (a default None) or of another rank
        return False


def check_inputs(module: torch.nn.Module, given: Mapping[str, object]) -> None:
    """The first statement of a captured graph's forward (``fxquant.capture.export``): check the inputs against
    the InputShapes recorded on the module (``module.meta['fxquant_shapes']``; copies of the model keep it)."""
    shapes = shapes_of(module)
    if shapes is not None:
        shapes.check(given)


def attach_shapes(model: torch.nn.Module, shapes: InputShapes | None) -> None:
    """Record ``shapes`` on ``model`` (its ``meta`` dict, which copies of a GraphModule keep)."""
    if shapes is None:
        return
    if not isinstance(getattr(model, "meta", None), dict):
        model.meta = {}
    model.meta["fxquant_shapes"] = shapes


def shapes_of(model: torch.nn.Module) -> InputShapes | None:
    """The InputShapes recorded on a prepared or converted model, or None (a model fxquant traced with torch.fx
    and no declared axes: only its batch is known to be free)."""
    meta = getattr(model, "meta", None)
    shapes = meta.get("fxquant_shapes") if isinstance(meta, dict) else None
    return shapes if isinstance(shapes, InputShapes) else None


# ---- from a torch.export capture ----------------------------------------------------------------------------
def from_program(program: torch.export.ExportedProgram, names: Sequence[str]) -> InputShapes:
    """The dynamic axes and guards of an exported program whose tensor inputs are the forward arguments
    ``names`` (in order)."""
    wanted = set(program.graph_signature.user_inputs)
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in wanted
            and isinstance(n.meta.get("val"), torch.Tensor)]
    symbols: dict[sympy.Symbol, str] = {}  # symbol -> its source, e.g. "L['input_ids'].size()[1]"
    dim_names: dict[sympy.Symbol, str] = {}
    dims, static = [], []
    for name, node in zip(names, user, strict=True):
        val = node.meta.get("val")
        axes = []
        for axis, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.maybe_as_int() is not None:
                size = size.node.maybe_as_int()
            if isinstance(size, int):  # fixed by the code (or the capture): the graph holds this size
                static.append(f"L['{name}'].size()[{axis}] == {size}")
            elif isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                sym = size.node.expr
                symbols.setdefault(sym, f"L['{name}'].size()[{axis}]")
                dim_names.setdefault(sym, "batch" if axis == 0 else f"{name}_dim{axis}")
                axes.append((axis, dim_names[sym]))
        dims.append(tuple(axes))
    guards = static + list(getattr(program, "_guards_code", []))
    for sym, (lo, hi) in _ranges(program).items():
        if sym in symbols:
            source = symbols[sym]
            guards += [f"{source} >= {lo}"] * (lo > 1) + [f"{source} <= {hi}"] * (hi is not None)
    return InputShapes(tuple(names), tuple(dims), tuple(dict.fromkeys(guards)),
                       _conditions(user))


def _ranges(program: torch.export.ExportedProgram) -> dict[sympy.Symbol, tuple[int, int | None]]:
    out = {}
    for sym, vr in program.range_constraints.items():
        lo = int(vr.lower) if vr.lower not in (-int_oo, -sympy.oo) else 0
        hi = int(vr.upper) if vr.upper not in (int_oo, sympy.oo) else None
        out[sym] = (lo, hi)
    return out


def _conditions(user: list[fx.Node]) -> tuple[tuple[str, str, str, bool], ...]:
    """(code, readable text, site, whether the user's own code set it) of each condition on the input sizes in
    the capture's shape environment."""
    val = next((n.meta.get("val") for n in user if isinstance(n.meta.get("val"), torch.Tensor)), None)
    env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
    if env is None:
        return ()
    out = []
    for guard in env.guards:
        sources = {s: env.var_to_sources.get(s) for s in guard.expr.free_symbols}
        if not sources or not all(sources.values()):
            continue  # a condition on sizes the inputs do not carry
        names = {s: src[0].name for s, src in sources.items()}  # "L['x'].size()[1]"
        code = _PRINTER.doprint(guard.expr.xreplace({s: sympy.Symbol(n) for s, n in names.items()}))
        readable = {s: sympy.Symbol(n.replace("L['", "").replace("']", ""), positive=True, integer=True)
                    for s, n in names.items()}
        text = _PRINTER.doprint(_tidy(guard.expr.xreplace(readable)))
        frame = guard.sloc.framework_loc
        path = getattr(frame, "filename", "")
        site = "" if not path or path.startswith((_TORCH_DIR, _OWN_DIR)) else (
            f"{os.path.basename(path)}:{frame.lineno}" + (f" (`{frame.line.strip()}`)" if frame.line else ""))
        own = bool(site) and not any(part in path for part in ("site-packages", "dist-packages"))
        out.append((code, text, site, own))
    return tuple(dict.fromkeys(out))


def _tidy(expr: sympy.Basic) -> sympy.Basic:
    """``x == min(512, x)`` as ``x <= 512``; ``16*b*t == 96*b`` (sizes are positive) as ``t == 6``."""
    if isinstance(expr, sympy.Or):
        return sympy.Or(*(_tidy(arg) for arg in expr.args))
    if not isinstance(expr, sympy.Eq):
        return expr
    lhs, rhs = expr.args
    for a, b in ((lhs, rhs), (rhs, lhs)):
        if type(b).__name__ == "Min" and a in b.args and len(b.args) == 2:  # sympy's or torch's Min
            return sympy.Le(a, next(x for x in b.args if x != a))
    diff = sympy.factor(lhs - rhs)
    kept = [f for f in (diff.args if isinstance(diff, sympy.Mul) else (diff,)) if not f.is_positive]
    rest = sympy.Mul(*kept)
    if len(rest.free_symbols) == 1 and rest.is_polynomial() and sympy.degree(rest) == 1:
        sym = next(iter(rest.free_symbols))
        return sympy.Eq(sym, sympy.solve(rest, sym)[0])
    return expr


# ---- declared by the user -----------------------------------------------------------------------------------
def declared_dims(dynamic_shapes: object, names: Sequence[str], inputs: tuple) -> Declared | None:
    """``dynamic_shapes`` (torch.export's form, for the example ``inputs`` of the forward arguments ``names``) as
    one ``{axis: spec}`` dict (or None) per example input; ConfigError for what torch.export would not take."""
    if dynamic_shapes is None:
        return None
    if isinstance(dynamic_shapes, Mapping):
        unknown = [k for k in dynamic_shapes if k not in names[:len(inputs)]]
        if unknown:
            raise ConfigError(f"dynamic_shapes names {unknown}, which are not example inputs of the forward "
                              f"({', '.join(names[:len(inputs)])})")
        entries = [dynamic_shapes.get(n) for n in names[:len(inputs)]]
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(inputs):
            raise ConfigError(f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(inputs)} example input(s); "
                              "give one per example input (None for an input with no dynamic axis)")
        entries = list(dynamic_shapes)
    else:
        raise ConfigTypeError("dynamic_shapes must be a tuple (one entry per example input) or a dict keyed by the "
                              "forward's argument names, as torch.export takes it; got "
                              f"{type(dynamic_shapes).__name__}")
    return tuple(_axes(entry, x, i) for i, (entry, x) in enumerate(zip(entries, inputs, strict=True)))


def declared_shapes(declared: Declared | None, names: Sequence[str]) -> InputShapes | None:
    """InputShapes of a declaration alone (a model torch.fx traced: its graph holds no sizes to guard)."""
    if declared is None:
        return None
    dims = []
    for name, axes in zip(names, declared, strict=False):
        dims.append(tuple((axis, _dim_name(spec, name, axis)) for axis, spec in sorted((axes or {}).items())
                          if spec is not None and spec is not Dim.STATIC))
    return InputShapes(tuple(names[:len(declared)]), tuple(dims), declared=True)


def _dim_name(spec: AxisSpec, name: str, axis: int) -> str:
    if isinstance(spec, Dim) and spec.__name__.isidentifier():
        return spec.__name__
    return "batch" if axis == 0 else f"{name}_dim{axis}"


def _axes(entry: object, x: object, index: int) -> dict[int, AxisSpec] | None:
    if entry is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"dynamic_shapes gives axes for example input {index}, which is not a tensor")
    if isinstance(entry, (tuple, list)):
        if len(entry) != x.dim():
            raise ConfigError(f"dynamic_shapes entry {index} lists {len(entry)} axes, but example input {index} has "
                              f"{x.dim()} ({list(x.shape)})")
        entry = dict(enumerate(entry))
    if not isinstance(entry, Mapping):
        raise ConfigTypeError(f"dynamic_shapes entry {index} must be a dict {{axis: Dim}} or a tuple with one entry "
                              f"per axis, got {type(entry).__name__}")
    axes = {}
    for axis, spec in entry.items():
        if not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ConfigError(f"dynamic_shapes entry {index} names axis {axis!r}, but example input {index} has "
                              f"{x.dim()} axes ({list(x.shape)})")
        if spec is not None and not _is_dim(spec):
            raise ConfigTypeError(f"dynamic_shapes entry {index}, axis {axis}: expected a torch.export.Dim, "
                                  f"Dim.AUTO, Dim.DYNAMIC, Dim.STATIC or None, got {spec!r}")
        axes[axis % x.dim()] = spec
    return axes


def _is_dim(spec: object) -> bool:
    return isinstance(spec, (Dim, type(Dim.AUTO)))
