"""What export_onnx validates before and after exporting: the path, dtypes, the example, the opset, the batch
dimension, and a file that appears only when the whole export succeeded."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator

import onnx
import torch
from onnx import version_converter

from fxquant.errors import ExportError, FxQuantError
from fxquant.lower.outputs import flat_outputs


def export_path(path: object) -> str:
    """``path`` as a str (bytes and os.PathLike are decoded as the OS does)."""
    if isinstance(path, (bytes, str, os.PathLike)):
        return os.fsdecode(path)
    raise ExportError(f"path must be a str, bytes or os.PathLike file name, got {type(path).__name__}")


def clones(inputs: tuple) -> tuple:
    """Fresh copies of the example tensors: a forward that edits its input in place never touches the user's."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def check_dtypes(model: torch.nn.Module, inputs: tuple) -> None:
    """Raise ExportError for a model or example that is not float32 (QDQ ONNX quantizes float32 tensors)."""
    tensors = [("the model's `" + n + "`", t) for n, t in (*model.named_parameters(), *model.named_buffers())]
    tensors += [(f"example input {i}", x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    for what, t in tensors:
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ExportError(f"{what} is {str(t.dtype).replace('torch.', '')}; QDQ ONNX export needs a float32 model "
                              "and float32 examples (QuantizeLinear reads float32 activations; TensorRT picks "
                              "fp16 kernels itself with --fp16): prepare, calibrate and convert model.float(), or "
                              "cast the converted model and the examples with .float()")


def run_example(model: torch.nn.Module, inputs: tuple) -> object:
    """The model's output on (a copy of) the example; ExportError for an empty, unfitting or output-less example."""
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0:
            raise ExportError(f"example input {i} has 0 samples (shape {list(x.shape)}); export and its ONNX Runtime "
                              "check need at least one sample: pass a batch of 1 or more")
    try:
        with torch.no_grad():
            sample = model(*clones(inputs))
    except FxQuantError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}" if isinstance(x, torch.Tensor)
                           else type(x).__name__ for x in inputs)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"the converted model failed on the example inputs ({shapes}): {type(exc).__name__}: "
                          f"{first}. Pass examples of the shape and dtype the model was calibrated on") from exc
    if not flat_outputs(sample):
        raise ExportError(f"the model's forward returned {type(sample).__name__} (no tensor): an ONNX model "
                          "needs at least one output; return the tensors to deploy")
    return sample


def honour_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at exactly ``opset`` (torch's exporter writes opset 18 or later and converts down best-effort)."""
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current == opset:
        return proto
    try:
        converted = version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"opset {opset} cannot be written: torch's exporter writes opset {current} and ONNX's "
                          f"version converter failed ({first[-160:]}); pass opset={current} or later (TensorRT 8.6+ "
                          "and ONNX Runtime 1.14+ read opset 18)") from exc
    return converted


def _first_dims(values: list) -> list[tuple[str, int | None]]:
    """(name, static first dimension or None when symbolic) of each ranked value."""
    out = []
    for v in values:
        shape = v.type.tensor_type.shape if v.type.tensor_type.HasField("shape") else None
        if shape is not None and len(shape.dim) > 0:
            out.append((v.name, shape.dim[0].dim_value if shape.dim[0].HasField("dim_value") else None))
    return out


def warn_static_batch(proto: onnx.ModelProto, dynamic_batch: bool, batch: int | None) -> None:
    """Warn when a dynamic batch was asked for but the batch dimension of an input, or of an output (the
    example's batch size, fixed: ``reshape(2, -1)``), came out static."""
    if not dynamic_batch:
        return
    fixed = [(n, b) for n, b in _first_dims(list(proto.graph.input)) if b is not None]
    if not fixed and any(b is None for _, b in _first_dims(list(proto.graph.input))):
        fixed = [(n, b) for n, b in _first_dims(list(proto.graph.output)) if b is not None and b == batch]
    if fixed:
        warnings.warn(f"the ONNX model's batch is static ({', '.join(f'{n}: {b}' for n, b in fixed)}): the model "
                      "fixes its batch size (e.g. reshape(2, -1) or a view with a literal batch), so it is right "
                      "only at that batch size. Use x.reshape(x.shape[0], -1) or flatten(1) for a dynamic batch, "
                      "or pass dynamic_batch=False to accept it", stacklevel=3)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """A temporary path beside ``path``, renamed to ``path`` when the block succeeds and deleted when it fails:
    a failed export leaves no file behind (and an existing file untouched)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fxquant-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
