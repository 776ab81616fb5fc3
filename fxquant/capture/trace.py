"""Capture: torch.fx symbolic tracing with a leaf policy, shape propagation, and errors that name the culprit."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import linecache
import os
import sys
import traceback
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.capture.inplace import aliasing_hazard, kept_buffers
from fxquant.errors import ExampleInputError, ExampleTypeError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)
_MODELS_DIR = os.path.join(_OWN_DIR, "models")  # fxquant's own example models are user code here


def matches(name: str, module: nn.Module, globs: Sequence[str]) -> bool:
    """True when a module's qualified name or class name matches one of the globs."""
    cls = type(module).__name__
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(cls, g) for g in globs)


class _Tracer(fx.Tracer):
    """Default leaves plus user globs and exact names; remembers which module it is inside for error messages."""

    def __init__(self, leaf_globs: Sequence[str], leaf_names: Collection[str] = ()) -> None:
        super().__init__()
        self.leaf_globs = tuple(leaf_globs)
        self.leaf_names = frozenset(leaf_names)
        self._module_stack: list[tuple[str, nn.Module]] = []
        self.failed_in: list[tuple[str, nn.Module]] | None = None  # the module stack where tracing failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_globs and matches(module_qualified_name, m, self.leaf_globs):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._module_stack.append((name, m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the exception first
                self.failed_in = list(self._module_stack)
            raise
        finally:
            self._module_stack.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and fxquant: the user's line that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if (not f.filename.startswith((_TORCH_DIR, _OWN_DIR)) or f.filename.startswith(_MODELS_DIR))
              and not f.filename.startswith("<")]
    return frames[-1] if frames else None


@dataclass(frozen=True)
class TraceFailure:
    """Where and why torch.fx failed: ``module`` is the failing submodule's name relative to the traced
    module ("" for the traced module's own code); ``reason`` is one line ending in the user's source line."""

    module: str
    cls: str
    reason: str
    message: str  # the full TraceError message, with what to do


def try_trace(model: nn.Module, leaf_globs: Sequence[str] = (), leaf_names: Collection[str] = (),
              concrete_args: dict[str, object] | None = None) -> tuple[fx.GraphModule | None, TraceFailure | None]:
    """Symbolically trace ``model``: (GraphModule, None), or (None, where and why it failed)."""
    tracer = _Tracer(leaf_globs, leaf_names)
    # torch.fx runs code on buffers (constants to it) while tracing: what it changed is undone
    with kept_buffers(model) as changed:
        try:
            graph = tracer.trace(model, concrete_args=concrete_args or None)
        except Exception as exc:  # torch.fx raises many types; all of them become one actionable error
            return None, _failure(tracer, model, exc)
    if concrete_args:
        _keep_argument_names(model, graph, concrete_args)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    hazard = None if changed else aliasing_hazard(gm)
    if changed or hazard is not None:
        return None, _inplace_failure(model, changed, hazard)
    return gm, None


def _inplace_failure(model: nn.Module, buffers: list[str], node: fx.Node | None) -> TraceFailure:
    """Why a module whose forward changes its buffers, or changes memory another value shares, stays eager."""
    if buffers:
        owner = buffers[0].rpartition(".")[0]
        what = f"its forward changes buffer `{buffers[0].rpartition('.')[2]}` in place"
    else:
        stack = list(node.meta.get("nn_module_stack", {}))
        owner = stack[-2 if node.op == "call_module" else -1] if len(stack) > (node.op == "call_module") else ""
        what = f"in-place `{node.target if isinstance(node.target, str) else node.target.__name__}` changes memory " \
               "that is read again through another value (a view or its base)"
        owner = owner if owner in dict(model.named_modules()) else ""
    module = model.get_submodule(owner) if owner else model
    reason = f"{what}, which a torch.fx graph cannot keep"
    where = f"`{owner}` ({type(module).__name__})" if owner else f"the root module ({type(model).__name__})"
    message = (f"torch.fx could not capture {where}: {reason}. Without strict=True prepare() runs it eagerly and "
               "quantizes the layers it calls; or write the op out of place (y = y.relu()) on a value no view shares")
    return TraceFailure(owner, type(module).__name__, reason, message)


def _keep_argument_names(model: nn.Module, graph: fx.Graph, fixed: dict[str, object]) -> None:
    """torch.fx renames arguments fixed by concrete_args (``flag`` -> ``flag_1``); callers pass them by keyword,
    so the traced forward keeps the original names, with the fixed values as defaults."""
    names = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(names) != len(placeholders):
        return
    for node, name in zip(placeholders, names, strict=True):
        node.target = name
        if name in fixed and isinstance(fixed[name], (bool, int, float, str, type(None))):
            node.args = (fixed[name],)


def _failure(tracer: _Tracer, model: nn.Module, exc: Exception) -> TraceFailure:
    stack = tracer.failed_in or tracer._module_stack  # the stack is unwound by the time we get here
    name, module = stack[-1] if stack else ("", model)
    where = f"`{name}` ({type(module).__name__})" if name else f"the root module ({type(model).__name__})"
    frame = _user_frame(exc)
    line = ""
    if frame is not None:
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        line = f" at {os.path.basename(frame.filename)}:{frame.lineno}: `{code}`"
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0] if text else ''}{line}"
    if name:
        fix = (f"To quantize the rest of the model, keep that module whole with "
               f"QuantConfig(leaf_modules=({name!r},)) (its insides then stay float and are reported), run it "
               f"eagerly and quantize inside it (the default without strict=True), or "
               f"rewrite the line without data-dependent control flow.")
    else:  # the root cannot be a leaf: nothing would be left to quantize
        fix = ("Rewrite the line without data-dependent control flow, or move that code into a submodule and "
               "keep the submodule whole with QuantConfig(leaf_modules=('<its name>',)); without strict=True "
               "prepare() runs such code eagerly and quantizes the submodules it calls.")
    message = f"torch.fx could not trace {where}{line}: {type(exc).__name__}: {exc}. {fix}"
    return TraceFailure(name, type(module).__name__, reason, message)


def trace(model: nn.Module, leaf_globs: Sequence[str] = (), concrete_args: dict[str, object] | None = None
          ) -> fx.GraphModule:
    """Symbolically trace ``model``; on failure raise TraceError naming the module and the line."""
    gm, failure = try_trace(model, leaf_globs, concrete_args=concrete_args)
    if failure is not None:
        raise TraceError(failure.message)
    return gm


def normalize_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple; a lone tensor is wrapped, NumPy arrays become tensors (dtype kept)."""
    if isinstance(example_inputs, np.ndarray):
        example_inputs = torch.from_numpy(np.ascontiguousarray(example_inputs))
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise ExampleTypeError(f"example_inputs must be a tensor or a tuple of tensors, got "
                               f"{type(example_inputs).__name__}; pass one tensor per forward argument")
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
                 for x in example_inputs)


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running and does not print the traceback of a failure
    (torch's ShapeProp prints it, then raises; propagate_shapes raises one ExampleInputError instead)."""

    current: fx.Node | None = None

    def call_module(self, target: str, args: tuple, kwargs: dict) -> object:
        # fx hands modules immutable lists; the generated code passes plain ones, which eager code may mutate
        return super().call_module(target, _mutable(args), _mutable(kwargs))

    def run_node(self, n: fx.Node) -> object:
        self.current = n
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            result = super().run_node(n)
        if buf.getvalue():  # the node's own output to stderr (e.g. warnings), passed on when it succeeded
            sys.stderr.write(buf.getvalue())
        return result


def _mutable(value: object) -> object:
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value)
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run the graph once on the example inputs, recording tensor metadata on every node."""
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(example_inputs) > n_placeholders:
        raise ExampleInputError(f"the model's forward takes {n_placeholders} input(s) but {len(example_inputs)} "
                                f"example inputs were given; pass one example per forward argument")
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            prop.propagate(*example_inputs)
    except Exception as exc:
        # ShapeProp wraps the real error in "ShapeProp error for: node=..."; report the original one
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        text = str(cause).strip()
        node, where = prop.current, ""
        if node is not None and node.op == "call_module":
            where = f" at `{node.target}` ({type(gm.get_submodule(node.target)).__name__})"
        elif node is not None:
            where = f" at `{node.name}`"
        raise ExampleInputError(f"the model failed on the example inputs "
                                f"({', '.join(_describe(x) for x in example_inputs)}){where}: "
                                f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}. Pass inputs of "
                                f"the shape and dtype the model's forward expects") from exc


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__
