"""Model outputs as ONNX sees them: a flat tuple of tensors with readable names.

torch.export (under the ONNX exporter) takes tensors, tuples, lists and dicts, but not dataclasses it has
no pytree registration for (``ModelOutput``-style results), and ONNX has no None outputs. ``flat_outputs``
walks any nesting of those and names each tensor by its path (``pooler_output``, ``hidden_states.1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from fxquant.errors import ConversionError


def flat_outputs(out: object, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in ``out``, depth first; None entries are dropped."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(x: object, path: str) -> None:
        if isinstance(x, torch.Tensor):
            found.append((path, x))
        elif x is None:
            return
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, (tuple, list)):
            for i, v in enumerate(x):
                walk(v, f"{path}.{i}" if path else str(i))
        else:
            raise ConversionError(f"the model's output `{path or name}` is a {type(x).__name__}; ONNX outputs are "
                                  "tensors. Return tensors (in tuples, lists, dicts or dataclasses), or wrap the "
                                  "model in a module whose forward returns only the tensors to export")

    walk(out, "" if _is_structured(out) else name)
    return found


def _is_structured(out: object) -> bool:
    return isinstance(out, Mapping) or (dataclasses.is_dataclass(out) and not isinstance(out, type))


def needs_flattening(out: object) -> bool:
    """True unless ``out`` is a tensor or a flat tuple/list of tensors (what the exporter takes as is)."""
    if isinstance(out, torch.Tensor):
        return False
    return not (isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out))


class FlatOutputs(nn.Module):
    """Wraps a model so that its forward returns the flat tuple of tensors ``flat_outputs`` finds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flat_outputs(self.model(*args)))


def strip_wrapper_prefix(proto, prefix: str = "model") -> None:
    """Drop the ``model.`` / ``model/`` prefix FlatOutputs adds to initializer, value and node names."""
    def strip(name: str) -> str:
        for p in (f"{prefix}.", f"{prefix}/"):
            if name.startswith(p):
                return name[len(p):]
        return name

    graph = proto.graph
    for t in graph.initializer:
        t.name = strip(t.name)
    for v in (*graph.input, *graph.output, *graph.value_info):
        v.name = strip(v.name)
    for node in graph.node:
        node.input[:] = [strip(n) for n in node.input]
        node.output[:] = [strip(n) for n in node.output]
        node.name = strip(node.name)
