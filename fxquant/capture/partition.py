"""Partial capture: trace the largest parts of a model torch.fx can trace; keep the rest eager.

``partition(model, example_inputs, config)`` tries the whole model first (the common case costs one trace).
When torch.fx fails inside a submodule, that submodule becomes a leaf of the trace (it runs eagerly) and the
trace is retried; when a module's own code fails (the root included), it runs eagerly and each module it calls
is partitioned the same way, with the inputs it was called with on the example inputs. Conv/Linear layers
called from eager code are listed for module swap (``fxquant.passes.eager_quant``). Non-tensor arguments of a traced
submodule (``output_attentions=False``, ``mask=None``) are fixed at the values they were called with.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from fxquant.capture.export import export_trace
from fxquant.capture.trace import matches, try_trace
from fxquant.errors import ExampleInputError, TraceError
from fxquant.ops.quant_modules import has_quant_form
from fxquant.spec import QuantConfig


@dataclass
class TracedPart:
    """A traced part of the model: ``path`` is its qualified name in the model ("" for the root)."""

    path: str
    gm: fx.GraphModule
    inputs: tuple  # every forward argument, in signature order, as it was called on the example inputs
    fixed: dict[str, object] = field(default_factory=dict)  # arguments fixed while tracing


@dataclass
class Partition:
    """Traced parts, eager modules with the reason, and weighted layers called from eager code."""

    traced: list[TracedPart] = field(default_factory=list)
    eager: list[tuple[str, str, str]] = field(default_factory=list)  # (path, class name, reason)
    swaps: list[tuple[str, tuple]] = field(default_factory=list)  # (path, positional inputs of its first call)
    eager_float: list[tuple[str, nn.Module]] = field(default_factory=list)  # other torch.nn ops in eager code
    uncalled: list[str] = field(default_factory=list)  # modules in eager code the example inputs never call
    notes: list[str] = field(default_factory=list)  # how the parts were captured, when it is worth saying


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _has_tensor(value: object) -> bool:
    return any(isinstance(x, torch.Tensor) for x in tree_leaves(value))


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict[str, object]] | str:
    """(all arguments in signature order, the non-tensor ones to fix while tracing), or why it cannot."""
    sig = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return "its forward takes *args/**kwargs, which torch.fx cannot give placeholders"
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        return f"its inputs do not bind to its forward: {exc}"
    bound.apply_defaults()
    values = tuple(bound.arguments.values())
    fixed = {name: v for name, v in bound.arguments.items() if not _has_tensor(v)}
    return values, fixed


class _Recorder:
    """Runs the model once on the example inputs and keeps each module's first call (args, kwargs)."""

    def __init__(self, model: nn.Module, example_inputs: tuple) -> None:
        self.calls: dict[int, tuple[tuple, dict]] = {}
        handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in model.modules()]
        try:
            with torch.no_grad():
                model(*example_inputs)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.setdefault(id(module), (args, dict(kwargs)))


class _Partitioner:
    def __init__(self, model: nn.Module, example_inputs: tuple, config: QuantConfig) -> None:
        self.model = model
        self.inputs = example_inputs
        self.config = config
        self.result = Partition()
        self._recorder: _Recorder | None = None

    def calls(self) -> dict[int, tuple[tuple, dict]]:
        if self._recorder is None:  # only models that need it pay for the extra eager forward
            self._recorder = _Recorder(self.model, self.inputs)
        return self._recorder.calls

    def eager(self, path: str, module: nn.Module, reason: str) -> None:
        self.result.eager.append((path, type(module).__name__, reason))
        for name, child in module.named_children():
            self.visit(_join(path, name), child)

    def visit(self, path: str, module: nn.Module) -> None:
        """Partition ``module`` (called from eager code, or the root)."""
        cfg = self.config
        if path and cfg.leaf_modules and matches(path, module, cfg.leaf_modules):
            self.result.eager_float.append((path, module))  # kept whole on request: its insides stay float
            return
        call = (self.inputs, dict(cfg.concrete_args)) if not path else self.calls().get(id(module))
        if call is None:  # never called: a container (ModuleList) whose modules may be, or an unused module
            children = list(module.named_children())
            if not children:
                self.result.uncalled.append(path)
            for name, child in children:
                self.visit(_join(path, name), child)
            return
        if path and has_quant_form(module):
            self.result.swaps.append((path, call[0]))
            return
        if path and _is_torch_leaf(module):
            self.result.eager_float.append((path, module))
            return
        if cfg.non_traceable and matches(path, module, cfg.non_traceable):
            self.eager(path, module, "named in QuantConfig.non_traceable")
            return
        bound = _bind(module, *call)
        if isinstance(bound, str):
            if not path and "do not bind" in bound:
                n = len(inspect.signature(module.forward).parameters)
                raise ExampleInputError(f"the model's forward takes {n} input(s) but {len(self.inputs)} example "
                                        f"inputs were given; pass one example per forward argument ({bound})")
            if not path and not cfg.leaf_modules and not cfg.non_traceable \
                    and self.exported(module, self.inputs, {}, bound):
                return
            self.eager(path, module, bound)
            return
        values, fixed = bound
        self.trace(path, module, values, fixed)

    def trace(self, path: str, module: nn.Module, values: tuple, fixed: dict[str, object]) -> None:
        cfg = self.config
        opaque: set[str] = set()  # leaf_modules: kept whole, insides float
        leaves: dict[str, tuple[nn.Module, str]] = {}  # run eagerly, insides partitioned
        if cfg.leaf_modules or cfg.non_traceable:  # globs match full names, so resolve them here
            for name, child in module.named_modules():
                if not name or any(name.startswith(f"{x}.") for x in (*opaque, *leaves)):
                    continue
                if cfg.leaf_modules and matches(_join(path, name), child, cfg.leaf_modules):
                    opaque.add(name)
                elif cfg.non_traceable and matches(_join(path, name), child, cfg.non_traceable):
                    leaves[name] = (child, "named in QuantConfig.non_traceable")
        while True:
            gm, failure = try_trace(module, (), opaque | leaves.keys(), fixed)
            if failure is None:
                break
            if not path and not failure.module and not opaque and not leaves \
                    and self.exported(module, values, fixed, failure.reason):
                return
            if self.config.strict:
                raise TraceError(failure.message)
            if not failure.module or failure.module in leaves:  # the module's own code: it runs eagerly
                self.eager(path, module, f"torch.fx failed: {failure.reason}")
                return
            for inner in [name for name in leaves if name.startswith(f"{failure.module}.")]:
                del leaves[inner]  # inside the new leaf: revisited from there
            leaves[failure.module] = (module.get_submodule(failure.module), f"torch.fx failed: {failure.reason}")
        self.result.traced.append(TracedPart(path, gm, values, fixed))
        for name, (child, reason) in leaves.items():
            self.eager(_join(path, name), child, reason)


    def exported(self, module: nn.Module, values: tuple, fixed: dict[str, object], reason: str) -> bool:
        """Capture the whole root with torch.export when symbolic tracing fails (``fxquant.capture.export``)."""
        gm, why = export_trace(module, values)
        if gm is None:
            self.result.notes.append(f"torch.export could not capture the model either ({why}); traced in parts")
            return False
        self.result.traced.append(TracedPart("", gm, values, fixed))
        self.result.notes.append(f"captured whole with torch.export (torch.fx failed: {reason})")
        return True


def _is_torch_leaf(module: nn.Module) -> bool:
    """A torch.nn module torch.fx keeps whole (ReLU, LayerNorm, Embedding, ...)."""
    return fx.Tracer().is_leaf_module(module, "")


def partition(model: nn.Module, example_inputs: tuple, config: QuantConfig) -> Partition:
    """Split ``model`` into traced parts and eager code (see the module docstring)."""
    p = _Partitioner(model, example_inputs, config)
    if config.non_traceable and matches("", model, config.non_traceable):
        p.eager("", model, "named in QuantConfig.non_traceable")
    else:
        p.visit("", model)
    return p.result
