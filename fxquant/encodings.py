"""Calibrate once, convert elsewhere: a readable JSON file of every quantizer's range.

``save_encodings(prepared, path)`` writes, per TensorQuantizer (keyed by module name), the range it calibrated
(``min``/``max``), what that range means (``scale``, ``zero_point``, ``amax``) and the spec fields that shape it.
``load_encodings(prepared, path)`` gives a model prepared from the same model with the same backend and config
those ranges, checking that the graphs match first, so it converts and exports as the calibrated one does.
Floats are written by ``repr`` and read back exactly, so a round trip reproduces every scale bit for bit.

(A calibrated prepared model's ``state_dict()`` also loads into a fresh prepare with ``load_state_dict``, unless
calibrate() split outlier channels: their float side path adds buffers a fresh prepare does not have.)

Ranges calibrated after a pass that changed the model (SmoothQuant, outlier channels in float: calibrate() runs
them first) only fit a model those passes changed the same way. The file records what they did
(``calibrate_passes``) and ``load_encodings`` refuses a model that differs, saying so. The same holds for weight
codes GPTQ or AdaRound chose: they live in the weights, not in the file, so a model they did not round is refused.
Bias corrections (``QuantConfig.bias_correction``; on by default for onnxruntime) are part of the calibration: the
file keeps each layer's shift (``bias_corrections``) and ``load_encodings`` sets the biases to the prepared model's
own minus those shifts.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxquant import qmath
from fxquant.errors import CalibrationError
from fxquant.files import output_path, write_text
from fxquant.ptq.input_means import shifted_layers, subtract_shift
from fxquant.ptq.layers import quantized_layers
from fxquant.quantizer import TensorQuantizer, quantizers_of
from fxquant.report import PTQReport
from fxquant.spec import QuantSpec
from fxquant.state import get_state
from fxquant.validate.encodings import chosen_widths, weight_mismatches
from fxquant.version import __version__

FORMAT_VERSION = 1
SPEC_FIELDS = ("num_bits", "axis", "symmetric", "unsigned", "narrow_range")  # must match the model's spec
# calibrate() passes that change the model: before its ranges (SmoothQuant, the outlier split), or its weight codes
# after them (GPTQ, AdaRound: the codes live in the weights, which an encodings file does not hold)
CHANGING_PASSES = ("smoothquant", "outlier_channels", "gptq", "adaround")
_CODES = ("gptq", "adaround")
_REDO = "prepare the same model with the same backend and config as the model the encodings were saved from"


class EncodingsError(CalibrationError, ValueError):
    """An encodings file does not fit the model (or is malformed); the message lists every difference."""


def _quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """The quantizers that hold a range; dynamic ones (``QuantSpec(dynamic=True)``) have none to save or load."""
    return {name: q for name, q in quantizers_of(model).items() if not q.spec.dynamic}


def _values(t: torch.Tensor, cast: type) -> float | int | list:
    """A 0-d tensor as a number, a per-channel one as a list (exact float32 -> Python float)."""
    values = [cast(v) for v in t.detach().cpu().reshape(-1).tolist()]
    return values[0] if t.dim() == 0 else values


def _entry(q: TensorQuantizer) -> dict[str, Any]:
    spec = q.spec
    return {
        "scale": _values(q.scale.float(), float),
        "zero_point": _values(q.zero_point.round(), int),
        "amax": _values(q.amax.float(), float),
        "min": _values(q._min.float(), float),
        "max": _values(q._max.float(), float),
        "num_bits": spec.num_bits,
        "axis": spec.axis,
        "symmetric": spec.symmetric,
        "unsigned": spec.unsigned,
        "narrow_range": spec.narrow_range,
        "calib_method": spec.calib_method,
        "qmin": spec.qmin,
        "qmax": spec.qmax,
    }


def _prepared(model: nn.Module, action: str) -> tuple[Any, dict[str, TensorQuantizer]]:
    state = get_state(model)
    quantizers = _quantizers(model)
    if state is None or state.stage == "converted":
        raise EncodingsError(f"{action} takes a model returned by fxquant.prepare() (the calibrated one to save, "
                             "a fresh one to load into); got " +
                             ("a converted model" if state else "a model that did not come from fxquant"))
    if not quantizers:
        raise EncodingsError(f"this model has no fxquant quantizers; {action} has nothing to do")
    return state, quantizers


def encodings_of(model: nn.Module) -> dict[str, Any]:
    """The encodings of a calibrated prepared model as a JSON-ready dict (what ``save_encodings`` writes)."""

    state, quantizers = _prepared(model, "save_encodings()")
    missing = [name for name, q in quantizers.items() if not q.is_calibrated]
    if missing:
        raise CalibrationError(f"{len(missing)} quantizer(s) have no range yet ({_shown(missing)}); run "
                               "fxquant.calibrate(prepared, batches) before saving the encodings")
    return {"fxquant_version": __version__, "format_version": FORMAT_VERSION, "backend": state.backend.name,
            "target": state.config.target, "calibrate_passes": _changes(state),
            "bias_corrections": _bias_shifts(state),
            "quantizers": {name: _entry(q) for name, q in quantizers.items()}}


def _bias_shifts(state: Any) -> dict[str, list[float]]:
    """Per layer, what calibrate()'s bias correction subtracted from its bias."""
    report = state.report.ptq.get("bias_correction")
    return dict(report.data.get("bias_shifts", {})) if report is not None else {}


def _bias_layers(model: nn.Module, shifts: object) -> tuple[dict[str, Any], list[str]]:
    """The layers the file's bias shifts name, and what does not fit (unknown layers, other channel counts)."""
    if not isinstance(shifts, Mapping):
        return {}, [f"'bias_corrections' must map layer names to lists of numbers, got {type(shifts).__name__}"]
    layers = {layer.name: layer for layer in quantized_layers(model, calibrated=False)[0]}
    found, problems = {}, []
    for name, values in shifts.items():
        layer = layers.get(name)
        if layer is None:
            problems.append(f"bias correction of `{name}`: no such quantized layer in this model")
            continue
        channels = layer.weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else layer.weight.shape[0]
        numbers = _as_numbers(values, channels, float)
        if numbers is None or not all(math.isfinite(v) for v in numbers):
            problems.append(f"bias correction of `{name}`: expected {channels} finite numbers")
            continue
        found[name] = (layer, torch.tensor(numbers, dtype=torch.float64))
    return found, problems


@torch.no_grad()
def _set_bias_shifts(model: nn.Module, state: Any, found: dict[str, Any]) -> None:
    """Biases = the model's own (its earlier corrections undone) minus the file's shifts; recorded in the report."""
    for layer, shift in shifted_layers(model):
        layer.bias.add_(shift.to(layer.bias))
    report = PTQReport("bias_correction", data={"method": "loaded", "max_shift": {}, "bias_shifts": {}})
    for layer, shift in found.values():
        subtract_shift(layer, shift, report)
    if found:
        state.report.ptq["bias_correction"] = report
    else:
        state.report.ptq.pop("bias_correction", None)


def _changes(state: Any) -> dict[str, list[str]]:
    """What the model-changing calibrate() passes did to this model (their report lines), by pass."""
    return {name: list(state.report.ptq[name].done) for name in CHANGING_PASSES
            if name in state.report.ptq and state.report.ptq[name].done}


def _pass_mismatch(saved: object, mine: dict[str, list[str]]) -> str | None:
    saved = saved if isinstance(saved, Mapping) else {}
    differing = sorted(name for name in CHANGING_PASSES if list(saved.get(name, [])) != mine.get(name, []))
    if not differing:
        return None
    told = "; ".join(f"{name}: {len(saved.get(name, []))} change(s) in the file, {len(mine.get(name, []))} in this "
                     "model" for name in differing)
    codes = [name for name in differing if name in _CODES]
    why = (f" ({' and '.join(codes)} chose weight codes that live in the weights, which an encodings file does not "
           "hold: loaded into another model they would silently round to nearest)") if codes else ""
    return (f"the encodings were calibrated on a model that calibrate()'s {' and '.join(differing)} changed "
            f"differently ({told}){why}: those ranges only fit the model they were calibrated on. Calibrate this model "
            "with fxquant.calibrate(prepared, batches), or keep the calibrated model itself (torch.save) or its "
            "exported ONNX")


_NUMBER = r"-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Infinity|NaN)"
_LIST = re.compile(rf"\[\s*({_NUMBER}(?:,\s*{_NUMBER})*)\s*\]")


def save_encodings(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Write the ranges of a calibrated prepared model's quantizers to ``path`` as indented JSON; returns the dict.

    Per quantizer (module name -> entry): ``scale``, ``zero_point``, ``amax``, ``min``, ``max`` (numbers for
    per-tensor quantizers, lists for per-channel ones; ``scale`` is the step size, ``x ~= (q - zero_point) *
    scale``) and the spec: ``num_bits``, ``axis``, ``symmetric``, ``unsigned``, ``narrow_range``,
    ``calib_method``, ``qmin``, ``qmax``. Top level: ``fxquant_version``, ``format_version``, ``backend``,
    ``target`` (``QuantConfig.target``: the CPU the weight widths were chosen for; null when none was declared).
    """
    path = output_path(path, "encodings", EncodingsError)
    data = encodings_of(model)
    text = json.dumps(data, indent=2, allow_nan=False)
    text = _LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)  # one line per list
    write_text(path, text + "\n")
    return data


def _shown(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read(source: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EncodingsError(f"{path} is not valid JSON ({exc}); pass a file written by "
                             "fxquant.save_encodings()") from exc
    except OSError as exc:
        raise EncodingsError(f"cannot read encodings from {path}: {exc.strerror or exc}; pass the path "
                             "fxquant.save_encodings() wrote") from exc
    except RecursionError as exc:  # json nests one Python call per level: a hostile file exhausts the stack
        raise EncodingsError(f"{path} nests JSON too deeply to be an encodings file; pass a file written by "
                             "fxquant.save_encodings()") from exc


def _channels(model: nn.Module, name: str, q: TensorQuantizer) -> int | None:
    """How many per-channel values ``q`` needs, or None for per-tensor (or when it cannot be told)."""
    axis = q.spec.axis
    if axis is None:
        return None
    if q._max is not None:
        return q._max.numel()
    if name.endswith("weight_quantizer"):
        weight = getattr(model.get_submodule(name.rpartition(".")[0]), "weight", None) if "." in name else None
        if isinstance(weight, torch.Tensor) and -weight.dim() <= axis < weight.dim():
            return weight.shape[axis]
    graph = getattr(model, "graph", None)
    for node in graph.nodes if graph is not None else ():
        meta = node.meta.get("tensor_meta")
        if node.op == "call_module" and node.target == name and hasattr(meta, "shape"):
            if -len(meta.shape) <= axis < len(meta.shape):
                return meta.shape[axis]
    return None


def _as_numbers(value: object, expected: int | None, kind: type) -> list | None:
    """``value`` as a flat list of ``kind`` numbers with the expected layout, or None when it does not fit."""
    ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
        (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    if expected is None:
        return [value] if ok(value) else None
    if not isinstance(value, list) or not all(ok(v) for v in value):
        return None
    return value if expected < 0 or len(value) == expected else None


def _check_entry(name: str, entry: object, q: TensorQuantizer, channels: int | None,
                 spec: QuantSpec) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
    """One entry's structural problems (it belongs to another graph), its value problems, and its range, for
    ``spec`` (the quantizer's own, or with the width the backend chose for it)."""
    if not isinstance(entry, Mapping):
        return [], [f"{name}: the entry is a {type(entry).__name__}, not an object"], {}
    absent = [k for k in (*SPEC_FIELDS, "min", "max") if k not in entry]
    if absent:
        return [], [f"{name}: the entry lacks {', '.join(absent)}"], {}
    diffs = [f"{k} file={entry[k]!r} model={getattr(spec, k)!r}" for k in (*SPEC_FIELDS, "qmin", "qmax")
             if k in entry and (type(entry[k]) is not type(getattr(spec, k)) or entry[k] != getattr(spec, k))]
    if diffs:
        return [f"{name}: spec differs ({'; '.join(diffs)})"], [], {}
    expected = None if spec.axis is None else (-1 if channels is None else channels)
    parsed: dict[str, list] = {}
    for key, kind in (("min", float), ("max", float), ("scale", float), ("zero_point", int), ("amax", float)):
        if key not in entry:  # scale, zero_point and amax are derived from min/max; checked when present
            continue
        values = _as_numbers(entry[key], expected, kind)
        if values is None:
            layout = ("a number" if expected is None else "a list of numbers" if expected < 0
                      else f"a list of {expected} numbers (one per channel)")
            got = f"a list of {len(entry[key])}" if isinstance(entry[key], list) else repr(entry[key])
            if isinstance(entry[key], list) and expected is not None and expected >= 0 \
                    and len(entry[key]) != expected:
                return [f"{name}: {key} has {len(entry[key])} channel values, the model has {expected}"], [], {}
            return [], [f"{name}: {key} must be {layout}{' (integers)' if kind is int else ''}, got {got}"], {}
        if not all(math.isfinite(v) for v in values):
            return [], [f"{name}: {key} holds NaN or infinite values"], {}
        parsed[key] = values
    if len({len(v) for v in parsed.values()}) > 1:
        return [], [f"{name}: min, max, scale, zero_point and amax have different lengths"], {}
    problems = []
    if any(s <= 0 for s in parsed.get("scale", ())):
        problems.append(f"{name}: scale must be > 0, got {min(parsed['scale'])}")
    if any(a < 0 for a in parsed.get("amax", ())):
        problems.append(f"{name}: amax must be >= 0, got {min(parsed['amax'])}")
    if any(lo > hi for lo, hi in zip(parsed["min"], parsed["max"], strict=True)):
        problems.append(f"{name}: min exceeds max")
    if problems:
        return [], problems, {}
    shape = () if expected is None else (len(parsed["min"]),)
    lo, hi = (torch.tensor(parsed[k], dtype=torch.float32).reshape(shape) for k in ("min", "max"))
    # The range is loaded from min and max: scale, zero_point and amax must be what that range gives.
    scale, zero_point = qmath.qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    derived = {"scale": scale, "zero_point": zero_point.round(), "amax": torch.maximum(lo.abs(), hi.abs())}
    for key, tensor in derived.items():
        if key in parsed and not torch.equal(tensor.reshape(-1), torch.tensor(parsed[key], dtype=torch.float32)):
            problems.append(f"{name}: {key} does not match min/max (ranges load from min and max: edit those and "
                            "drop scale, zero_point and amax, or save the encodings again)")
    return [], problems, ({} if problems else {"min": lo, "max": hi})


def load_encodings(model: nn.Module, source: str | os.PathLike | Mapping) -> nn.Module:
    """Give a prepared model the ranges in ``source`` (a file from ``save_encodings``, or its dict) and mark it
    calibrated, ready for ``fxquant.convert``; returns ``model``.

    Every quantizer of ``model`` gets its range from the entry of the same name (uncalibrated or not), after
    the whole file is checked: it must hold exactly the model's quantizers, with the same spec and channel
    counts, for the same backend, and finite values with positive scales. Otherwise an ``EncodingsError``
    (a ValueError and a CalibrationError) lists every missing, extra and differing quantizer and the model
    is left unchanged.
    """
    state, quantizers = _prepared(model, "load_encodings()")
    data = _read(source)
    if not isinstance(data, Mapping) or not isinstance(data.get("quantizers"), Mapping):
        raise EncodingsError("not an fxquant encodings file: it has no 'quantizers' object; pass a file written "
                             "by fxquant.save_encodings()")
    if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise EncodingsError(f"encodings format_version {data.get('format_version')!r} is not {FORMAT_VERSION}, "
                             "the one this fxquant reads; save the encodings with this fxquant version")
    if data.get("backend") != state.backend.name:
        raise EncodingsError(f"the encodings were saved for backend {data.get('backend')!r} but this model was "
                             f"prepared for {state.backend.name!r}; prepare it with backend={data.get('backend')!r} "
                             "(the backend decides where quantizers go and their specs)")
    if data.get("target") != state.config.target:  # files without the key were saved with no declared target
        raise EncodingsError(f"the encodings were saved for CPU target {data.get('target')!r} but this model was "
                             f"prepared with QuantConfig(target={state.config.target!r}); the target decides the "
                             "weight widths (ONNX Runtime's int8 kernels saturate on some CPUs): prepare it with "
                             f"QuantConfig(target={data.get('target')!r})")
    mismatch = _pass_mismatch(data.get("calibrate_passes"), _changes(state))
    if mismatch:
        raise EncodingsError(mismatch)
    entries = data["quantizers"]
    missing = [name for name in quantizers if name not in entries]
    extra = [name for name in entries if name not in quantizers]
    structural: list[str] = []
    problems: list[str] = []
    ranges: dict[str, dict] = {}
    widths = chosen_widths(state.backend, state.config, quantizers, entries)  # saturation-aware weight bits
    for name, q in quantizers.items():
        if name in entries:
            spec = q.spec.with_(num_bits=widths[name]) if name in widths else q.spec
            graph_diff, bad_values, ranges[name] = _check_entry(name, entries[name], q, _channels(model, name, q),
                                                                spec)
            structural += graph_diff
            problems += bad_values
    structural += weight_mismatches(model, quantizers, ranges, widths, state.config)
    bias_shifts, bias_problems = _bias_layers(model, data.get("bias_corrections", {}))
    problems += bias_problems
    if missing or extra or structural or problems:
        lines = [f"the encodings do not fit this model ({len(quantizers)} quantizers; the file has "
                 f"{len(entries)}):"]
        if missing:
            lines.append(f"  missing from the file ({len(missing)}): {_shown(missing, 20)}")
        if extra:
            lines.append(f"  in the file but not in the model ({len(extra)}): {_shown(extra, 20)}")
        found = structural + problems
        lines += [f"  {p}" for p in found[:20]] + ([f"  ... and {len(found) - 20} more"] if len(found) > 20 else [])
        hint = _REDO if missing or extra or structural else \
            "fix those values, or save the encodings again with fxquant.save_encodings()"
        raise EncodingsError("\n".join(lines) + f"\n{hint[0].upper()}{hint[1:]}.")
    fallback = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    for name, q in quantizers.items():
        device = next((b.device for b in (q._min, q._max) if b is not None), None) or \
            getattr(q, "_range_device", None) or fallback
        if name in widths:
            q.spec = q.spec.with_(num_bits=widths[name])
        q._min = ranges[name]["min"].to(device)  # set as-is: these are the final ranges (scale_amax applied)
        q._max = ranges[name]["max"].to(device)
    _set_bias_shifts(model, state, bias_shifts)
    state.stage = "calibrated"
    return model
