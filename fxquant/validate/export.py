"""What export_onnx validates before and after exporting: the path (checked before the work), dtypes, the example,
train mode and buffer updates, the opset the model can be written at, the batch dimension."""

from __future__ import annotations

import re
import warnings

import onnx
import torch
from onnx import version_converter

from fxquant.errors import ConfigError, ExportError, FxQuantError
from fxquant.files import output_path
from fxquant.lower.outputs import flat_outputs


def export_path(path: object) -> str:
    """``path`` as a str (bytes and os.PathLike are decoded as the OS does), checked before the export's work:
    a directory or a path below a file raises ExportError."""
    return output_path(path, "ONNX", ExportError)


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


# modules whose forward depends on train/eval mode (the root's own code may too: it is checked as well)
_MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)


def check_eval_mode(model: torch.nn.Module) -> None:
    """ExportError for a model left in training mode: export and its ORT check run the forward as it runs now
    (dropout random, BatchNorm on batch statistics), so the reference would not be the deployed function."""
    training = [name or "the model" for name, m in model.named_modules()
                if m.training and (not name or isinstance(m, _MODE_DEPENDENT))]
    if training:
        shown = ", ".join(f"`{n}`" for n in training[:4]) + (f" and {len(training) - 4} more" if len(training) > 4
                                                              else "")
        raise ExportError(f"the model is in training mode ({shown}): export traces the forward as it runs now, so "
                          "dropout would be random and BatchNorm would use batch statistics, in the ONNX file and in "
                          "the torch reference its ONNX Runtime check compares against; call model.eval() before "
                          "export_onnx (convert() returns a model in eval mode)")


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
    """The model at exactly ``opset`` (torch's exporter writes opset 18 or later and ONNX's version converter
    converts it); ExportError naming the op that stops the conversion and the lowest opset this model takes."""
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current == opset:
        return proto
    try:
        return _converted(proto, opset)
    except Exception as exc:
        lowest = next((v for v in range(opset + 1, current) if _converts(proto, v)), current)
        raise ExportError(f"opset {opset} cannot be written for this model: {_blocker(exc, opset)}. The lowest "
                          f"opset it can be written at is {lowest}: pass opset={lowest} or later (TensorRT 8.6+ and "
                          "ONNX Runtime 1.14+ read opset 18)") from exc


def _converted(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    converted = version_converter.convert_version(proto, opset)
    onnx.checker.check_model(converted, full_check=True)
    return converted


def _converts(proto: onnx.ModelProto, opset: int) -> bool:
    try:
        _converted(proto, opset)
    except Exception:
        return False
    return True


def _blocker(exc: Exception, opset: int) -> str:
    """What ONNX's version converter could not do, in words (its own text is a C++ assertion)."""
    text = " ".join(str(exc).split())
    op = re.search(r"(?:No Adapter (?:From|To) Version \$?(\d+) for|for operator|for op|No Previous Version of)"
                   r" (\w+)", text)
    if op and op.group(1):
        return f"ONNX's version converter cannot write its {op.group(2)} (as of opset {op.group(1)}) at opset {opset}"
    if op and "No Previous Version" in text:
        return f"{op.group(2)} does not exist at opset {opset}"
    if op:
        return f"ONNX's version converter cannot write its {op.group(2)} ops at opset {opset}"
    return f"ONNX's version converter failed ({text[-160:]})"


def check_opset(opset: object) -> None:
    """ConfigError for an opset that is not an int between 13 (per-axis QuantizeLinear) and the latest ONNX knows."""
    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not 13 <= opset <= latest:
        raise ConfigError(f"opset must be an int from 13 (per-axis QuantizeLinear) to {latest} (the latest this ONNX "
                          f"knows), got {opset!r}; 18 is the default, lower ones as far as ONNX's version converter "
                          "can write the model's ops (14 for most CNNs, 17 with LayerNormalization)")


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
