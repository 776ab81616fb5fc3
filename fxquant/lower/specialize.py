"""Export through data-dependent control flow by following the branch the example inputs take.

``if x.sum() > 0:`` in eager code stops torch.export (and so the ONNX exporter): the condition depends on
tensor values. ``torch.export.draft_export`` evaluates such conditions on the example inputs and records the
branch taken; ONNX drops the runtime assertions that guard it, so the exported model is specialized to that
branch. export_onnx does this only after the regular export failed on data-dependent control flow, and warns.
"""

from __future__ import annotations

import logging
import re

import torch

_SITE = re.compile(r'File "([^"]+)", line (\d+), in \w+\s*\n\s*(.+)')
_NO_TRANSLATION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")
_LOGGERS = ("torch.export", "torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export._draft_export")


def data_dependent_site(exc: BaseException) -> str | None:
    """``file:line: `code` `` of the data-dependent condition that stopped torch.export, or None if the
    export failed for another reason."""
    text = "\n".join(str(e) for e in _chain(exc))
    if "data-dependent" not in text and "DataDependent" not in text:
        return None
    m = _SITE.search(text)
    if m is None:
        return "a condition on tensor values"
    return f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}: `{m.group(3).strip()}`"


def untranslated_op(exc: BaseException) -> str | None:
    """The ATen op (``aten.name.overload``) torch.onnx found no ONNX translation for, or None if the export
    failed for another reason."""
    m = next((m for e in _chain(exc) if (m := _NO_TRANSLATION.search(str(e)))), None)
    return None if m is None else f"{m.group(1)}.{m.group(2)}"


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def export_specialized(model: torch.nn.Module, inputs: tuple, kwargs: dict):
    """The ONNX program of ``model`` with data-dependent branches fixed to those ``inputs`` take."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    try:
        for name in _LOGGERS:  # draft_export logs every specialization as a warning; export_onnx warns once
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.export.draft_export(model, inputs, dynamic_shapes=kwargs.get("dynamic_shapes"))
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    rest = {k: v for k, v in kwargs.items() if k != "dynamic_shapes"}
    return torch.onnx.export(program, inputs, **rest)
