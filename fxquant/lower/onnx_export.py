"""Lower a converted model to QDQ ONNX, then check it and verify it in ONNX Runtime.

Export goes through the dynamo exporter with a translation for fxquant's Q/DQ op, then the ONNX passes in
order (``fxquant.lower.export_passes``: the common ones, then those the backend declares in
``Backend.export_passes``), then the checks: metadata records fxquant's version, the backend and the
calibration methods; ONNX shape inference fills in every intermediate shape; onnx.checker, and ONNX Runtime
as the backend's ``runtime`` asks (as deployed for ORT, with its fusion and latency reports; for its meaning,
with TensorRT's fusion lint, for TensorRT).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from fxquant.backends.base import Backend
from fxquant.capture.inplace import kept_buffers
from fxquant.capture.shapes import InputShapes, shapes_of
from fxquant.capture.trace import normalize_inputs
from fxquant.errors import ConfigError, ConversionError, ExportError, FxQuantError
from fxquant.files import atomic_write
from fxquant.lower.exact.check import ExactCheck, Mismatch, check_exact, exact_differs_message
from fxquant.lower.export_passes import run_export_passes
from fxquant.lower.frozen import FrozenDynamicQuantizer, FrozenQuantizer
from fxquant.lower.onnx_passes import infer_shapes
from fxquant.lower.ort import latency as ort_latency
from fxquant.lower.ort.fusion import FusionReport, fusion_report
from fxquant.lower.ort.latency import LatencyCheck
from fxquant.lower.ort.targets import host_target, run_as
from fxquant.lower.outputs import FlatOutputs, flat_outputs, needs_flattening
from fxquant.lower.qdq_op import TRANSLATIONS
from fxquant.lower.size_guards import guard_sizes
from fxquant.lower.specialize import data_dependent_site, export_specialized, untranslated_op
from fxquant.lower.trt_lint import LintFinding, trt_fusion_lint
from fxquant.metrics import sqnr
from fxquant.spec import CPU_TARGETS, check_cpu_target
from fxquant.state import QuantState, get_state
from fxquant.validate.export import (
    check_dtypes,
    check_eval_mode,
    check_opset,
    clones,
    export_path,
    honour_opset,
    run_example,
    warn_static_batch,
)
from fxquant.version import __version__

DEFAULT_OPSET = 18
MIN_AGREEMENT_DB = 30.0


@dataclass
class ExportResult:
    """What export_onnx wrote and how well ONNX Runtime agreed with the fake-quant model."""

    path: str
    model: onnx.ModelProto
    ort_sqnr_db: float | None
    fusion: FusionReport | None = None  # ops meant to run in int8 that ORT left in float (runtime onnxruntime)
    latency: LatencyCheck | None = None  # int8 vs its float twin in ORT, one thread (runtime onnxruntime)
    trt_lint: list[LintFinding] | None = None  # what TensorRT would run in higher precision (runtime tensorrt)
    exact: ExactCheck | None = None  # an exact model: ORT's outputs element by element, the first differing tensor

    @property
    def differing_outputs(self) -> int | None:
        """For an exact model (convert(exact=...)): how many output elements ORT computes differently."""
        return None if self.exact is None else self.exact.differing

    @property
    def first_mismatch(self) -> Mismatch | None:
        """For an exact model: the first ONNX tensor (graph order) whose values ORT computes differently."""
        return None if self.exact is None else self.exact.first_mismatch

    @property
    def op_counts(self) -> Counter:
        return Counter(n.op_type for n in self.model.graph.node)


def export_onnx(model: torch.nn.Module, example_inputs: torch.Tensor | tuple, path: str | os.PathLike,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, verify: bool = True,
                check_latency: bool = True, check_cpu: str | None = None) -> ExportResult:
    """Export a converted model to QDQ ONNX at ``path``; check it with onnx.checker and, with ``verify``,
    run it in ONNX Runtime (all graph optimizations on) against the model on ``example_inputs``.

    For a backend that deploys on ORT (``Backend.runtime == "onnxruntime"``) export also reports the ops
    meant to run in int8 that ORT did not fuse (``ExportResult.fusion``) and, with ``check_latency``, times the
    int8 model against its float twin on ``example_inputs`` (one thread), warning where int8 is slower.
    ``check_cpu`` runs the ORT check as that CPU target (``fxquant.lower.ort.targets``: "vnni" or "avx2";
    ORT's int8 kernels compute differently on each): None runs it on this machine, a target this machine is
    not runs under the qemu-x86_64 emulator (small models: it is slow)."""
    state = get_state(model)
    if state is None or state.stage != "converted":
        raise ConversionError("export_onnx() takes the model returned by fxquant.convert() or fxquant.quantize(); "
                              + ("this one was never converted" if state else "this one did not come from fxquant"))
    if check_cpu is not None:
        check_cpu_target(check_cpu, "check_cpu")
    exact = model if state.exact is not None else None
    if exact is not None:  # the exact model exports its fake-quant twin's QDQ ONNX and is checked as its CPU
        if check_cpu not in (None, state.exact.target):
            raise ConfigError(f"this model computes what ONNX Runtime computes on a {state.exact.target!r} CPU; its "
                              f"check runs as that CPU: drop check_cpu={check_cpu!r}, or convert with "
                              f"exact={check_cpu!r}")
        model, check_cpu = state.exact.fake, state.exact.target
    check_opset(opset)
    for name, m in model.named_modules():
        if getattr(m, "num_bits", 8) > 8 and opset < 21:
            raise ConversionError(f"`{name}` quantizes to {m.num_bits} bits, which needs 16-bit Q/DQ (opset 21); "
                                  f"pass opset=21")
    if any(getattr(m, "per_token", False) for m in model.modules() if isinstance(m, FrozenDynamicQuantizer)):
        raise ConversionError("per-token dynamic activations (QuantSpec(per_token=True)) have no ONNX op: "
                              "DynamicQuantizeLinear takes one range per tensor; use QuantSpec(dynamic=True) "
                              "without per_token to export")
    inputs = normalize_inputs(example_inputs)
    path = export_path(path)
    check_dtypes(model, inputs)
    check_eval_mode(model)
    with kept_buffers(model) as changed:  # a forward that updates buffers: the model's state is what it was
        result = _export_checked(model, inputs, path, opset, dynamic_batch, verify, check_latency, check_cpu, exact)
    if changed:
        warnings.warn(f"the model's forward updates buffer(s) {', '.join(f'`{n}`' for n in changed[:4])} in place; an "
                      "ONNX model has no state, so the exported model starts every run from their values at "
                      "export (kept in the file); keep state updates out of the eval-mode forward if the deployed "
                      "model must advance it", stacklevel=2)
    return result


def _export_checked(model: torch.nn.Module, inputs: tuple, path: str, opset: int, dynamic_batch: bool,
                    verify: bool, check_latency: bool, check_cpu: str | None,
                    exact: torch.nn.Module | None = None) -> ExportResult:
    """export_onnx after its argument checks; ``exact``: the exact model whose fake-quant twin ``model`` is."""
    state = get_state(exact if exact is not None else model)
    sample = run_example(model, inputs)  # on a copy: the user's example is never edited
    wrapped = needs_flattening(sample)  # dicts, dataclasses (ModelOutput-style), None entries: flat, named
    shapes = shapes_of(model)  # the dynamic axes of its capture, or those declared at prepare
    if wrapped:
        proto = _export(FlatOutputs(model), clones(inputs), opset, dynamic_batch,
                        output_names=[name for name, _ in flat_outputs(sample)], shapes=shapes)
    else:
        proto = _export(model, clones(inputs), opset, dynamic_batch, shapes=shapes)
    backend = state.backend
    run_export_passes(proto, backend.export_passes, wrapped)  # common passes, then the backend's
    _set_metadata(proto, state, model)
    _check_sizes_in_graph(proto, shapes, backend.runtime)
    proto = honour_opset(infer_shapes(proto), opset)
    warn_static_batch(proto, dynamic_batch, next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor)
                                                  and x.dim() > 0), None))
    onnx.checker.check_model(proto, full_check=True)
    # A graph for ORT is verified as deployed (all fusions); a graph meant for another runtime (TensorRT) is
    # checked for its meaning without fusing it into ORT's own int8 CPU kernels (Backend.runtime).
    exact_check = None
    with atomic_write(path) as tmp:  # the file appears only once the export and its check succeeded
        onnx.save(proto, tmp)
        if verify and exact is not None:
            exact_check = check_exact(exact, inputs, tmp, state.exact.target)
            agreement = exact_check.sqnr_db
        else:
            agreement = verify_in_ort(model, inputs, tmp, backend.verify_level, check_cpu) if verify else None
    if exact_check is not None and exact_check.differing:
        warnings.warn(exact_differs_message(exact_check, state.exact.target), stacklevel=3)
    elif exact_check is None and agreement is not None and agreement < MIN_AGREEMENT_DB:
        cause = _low_agreement_cause(model, backend, check_cpu or host_target())
        warnings.warn(f"ONNX Runtime's output agrees with the fake-quant model at only {agreement:.1f} dB "
                      f"(< {MIN_AGREEMENT_DB} dB). {cause}", stacklevel=3)
    # ops meant to run in int8 that ORT's optimized graph left in float: a graph that deploys on ORT only
    fusion = fusion_report(path) if verify and backend.runtime == "onnxruntime" else None
    if fusion is not None and fusion.unfused:
        warnings.warn(fusion.summary(), stacklevel=3)
    latency = None
    if fusion is not None and check_latency and fusion.intended:  # nothing int8 (all float): nothing to time
        latency = ort_latency.check_latency(proto, [x.detach().cpu().numpy() for x in inputs])
        if latency.slower:
            warnings.warn(ort_latency.slower_message(latency, fusion), stacklevel=3)
    lint = trt_fusion_lint(proto) if backend.runtime == "tensorrt" else None
    if lint:
        warnings.warn(f"{len(lint)} place(s) TensorRT would run in higher precision (its Q/DQ fusion rules):\n"
                      + "\n".join(f"  {f.node} ({f.op_type}): {f.reason}" for f in lint), stacklevel=3)
    return ExportResult(path, proto, agreement, fusion, latency, lint, exact_check)


def _low_agreement_cause(model: torch.nn.Module, backend: Backend, cpu: str | None) -> str:
    """The likeliest reason for a low ORT agreement, from the model's quantizer widths and the CPU target ORT
    ran as (``cpu``: only pre-VNNI x86 saturates)."""
    widths = [(m.num_bits, m.scale.dim() > 0) for m in model.modules() if hasattr(m, "num_bits")]
    narrowest = min((bits for bits, _ in widths), default=8)
    if narrowest < 7:
        return (f"With {narrowest}-bit quantizers every float rounding difference between torch and ORT flips a whole "
                f"1/{2 ** narrowest} of a range, so low agreement is expected at this width: judge the model by its "
                "accuracy in ORT")
    eight_bit_weights = any(bits == 8 and per_channel for bits, per_channel in widths)
    if cpu == "avx2" and backend.runtime == "onnxruntime" and eight_bit_weights:
        return ("ORT ran as an x86 CPU without VNNI, where 8-bit weights can hit ORT's u8s8 saturation (adjacent "
                "products added in int16): declare the CPU (QuantConfig(target='avx2'), or no target: weights safe "
                "on both), keep the weight spec the backend chooses (Backend.saturation_aware_weights) or use "
                "7-bit weights")
    return ("Torch and ORT round floats differently and each quantizer turns such differences into whole-step flips, "
            "so agreement tracks the model's own int8-vs-fp32 SQNR: check that first (fxquant.sensitivity)")


def export_float_onnx(model: torch.nn.Module, example_inputs: torch.Tensor | tuple, path: str | os.PathLike,
                      opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> str:
    """Export a float model the same way (the fp32 baseline beside a QDQ model); returns the path."""
    inputs, path = normalize_inputs(example_inputs), export_path(path)
    proto = honour_opset(_export(model.eval(), clones(inputs), opset, dynamic_batch), opset)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_write(path) as tmp:
        onnx.save(proto, tmp)
    return path


def _export(model: torch.nn.Module, inputs: tuple, opset: int, dynamic_batch: bool,
            output_names: list[str] | None = None, shapes: InputShapes | None = None) -> onnx.ModelProto:
    """The ONNX model of ``model``: with the dynamic axes ``shapes`` holds (the capture's, or the user's), else a
    dynamic batch, else (the model fixes it) the example's sizes, with a warning."""
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    kwargs = dict(dynamo=True, custom_translation_table=TRANSLATIONS, opset_version=opset, input_names=names,
                  output_names=output_names, verbose=False)
    if dynamic_batch:
        tries = [] if shapes is None else [shapes.onnx_dims()[:len(inputs)]]
        tries += [] if shapes is not None and shapes.declared else [_batch_dims(inputs)]
        for dims in tries:
            try:
                if isinstance(model, FlatOutputs):  # its forward takes *args: one entry holding all inputs' dims
                    dims = (dims,)
                return _run_exporter(model, inputs, kwargs | {"dynamic_shapes": dims})
            except ConversionError:  # fails with a static batch too (an op without ONNX translation)
                raise
            except Exception as exc:
                if shapes is not None and shapes.declared:
                    raise ExportError(f"the model does not export with the dynamic axes declared at prepare "
                                      f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:500]}); declare "
                                      "only axes the model leaves free") from exc
                failed = exc
        # a model that fixes its batch size still exports, with a static batch
        warnings.warn(f"exporting with a dynamic batch dimension failed ({type(failed).__name__}); "
                      "exporting with the example batch size instead", stacklevel=4)
    return _run_exporter(model, inputs, kwargs)


def _batch_dims(inputs: tuple) -> tuple:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)


def _run_exporter(model: torch.nn.Module, inputs: tuple, kwargs: dict) -> onnx.ModelProto:
    where = None
    # the exporter prints each failed capture attempt's graph; failures reach the caller as exceptions
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model, inputs, **kwargs)
        except Exception as exc:
            where = data_dependent_site(exc)
            if (op := untranslated_op(exc)) is not None:
                raise ConversionError(f"torch.onnx has no ONNX translation for `{op}` with these arguments (a "
                                      "float model with this op fails the same way; e.g. adaptive pooling exports "
                                      "only when the output size divides the input size): change the op, or "
                                      "register a translation with torch.onnx") from exc
            if where is None:
                raise
            program = export_specialized(model, inputs, kwargs)
    if where is not None:
        warnings.warn(f"data-dependent control flow ({where}) cannot be expressed in ONNX: the export follows the "
                      "branch the example inputs took, so the ONNX model matches the torch model only on inputs "
                      "that take the same branches. Use torch.cond for both branches, or pass example inputs "
                      "that take the branch you deploy", stacklevel=5)
    return program.model_proto


def _check_sizes_in_graph(proto: onnx.ModelProto, shapes: InputShapes | None, runtime: str) -> None:
    """The conditions on dynamic sizes the capture holds (``fxquant.capture.shapes``): listed in the metadata
    (``fxquant.input_conditions``) and, for a graph ONNX Runtime runs, checked in the graph
    (``fxquant.lower.size_guards``: ORT then raises outside them, naming the condition). A condition left
    unchecked (TensorRT's graph, or one the check cannot express) that the user's own code set gets a warning:
    outside it the graph computes the captured path, not the model's; an installed library's (transformers'
    ``q_length > 1``) is listed only."""
    unchecked = shapes.unchecked() if shapes is not None else []
    if not unchecked:
        return
    described = {code: text + (f" ({site})" if site else "") for code, text, site, _ in unchecked}
    left = ({code for code, _ in guard_sizes(proto, described.items(), list(shapes.names))}
            if runtime == "onnxruntime" else set(described))
    checked = "; ".join(described[c] for c in described if c not in left)
    helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props} | {
        "fxquant.input_conditions": "; ".join(described.values())} | (
        {"fxquant.input_conditions_checked": checked} if checked else {}))
    branches = [f"`{text}` ({site})" for code, text, site, own in unchecked if own and code in left]
    if branches:
        where = ("TensorRT checks no condition on a dynamic size beyond its optimization profile"
                 if runtime == "tensorrt" else "the exported graph cannot check them")
        warnings.warn(f"the exported graph holds only for inputs where {', '.join(branches)}, conditions of "
                      f"your model's code on sizes its ONNX inputs keep dynamic; {where}, so "
                      "other sizes compute the captured path, not the model's. Check the sizes before running it "
                      "(they are in the ONNX metadata, fxquant.input_conditions; the fake-quant model raises "
                      "InputShapeError), or declare the axis static: prepare(..., dynamic_shapes=...)", stacklevel=4)


def _set_metadata(proto: onnx.ModelProto, state: QuantState, model: torch.nn.Module | None = None) -> None:
    """Record fxquant's version, the backend, the calibration methods in use, the ops left float and, for ORT CPU
    backends, the CPU target the weights were chosen for (``fxquant.target``: "vnni", "avx2", or "vnni,avx2" when
    none was declared: safe on both)."""
    backend, config = state.backend, state.config

    frozen = [] if model is None else [m for m in model.modules()
                                       if isinstance(m, (FrozenQuantizer, FrozenDynamicQuantizer))]

    def methods(role: str) -> str:
        used = {m.calib_method for m in frozen if m.constant == (role == "weight")}
        if used:  # what the quantizers used (load_calib_amax may have switched methods after calibrate)
            return ",".join(sorted(used))
        specs = [getattr(config, role) or getattr(backend, role)]
        specs += [getattr(o, role) for o in config.overrides if getattr(o, role) is not None]
        return ",".join(sorted({s.calib_method for s in specs}))

    proto.producer_name, proto.producer_version = "fxquant", __version__
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({"fxquant.version": __version__, "fxquant.backend": backend.name,
                  "fxquant.calib_method": methods("activation"), "fxquant.weight_calib_method": methods("weight"),
                  "fxquant.float_ops": ",".join(e.node for e in state.report.float_ops)})
    if backend.runtime == "onnxruntime":  # ORT CPU backends: their int8 kernels compute differently per CPU
        props["fxquant.target"] = config.target or ",".join(CPU_TARGETS)
    if state.exact is not None:
        props["fxquant.exact"] = state.exact.target  # exported from an exact model: checked bit for bit as this CPU
    helper.set_model_props(proto, props)


# ---- verification ---------------------------------------------------------------------------------------
def ort_session(path: str, optimized_path: str | None = None, threads: int | None = None,
                level: str = "all"):
    """An ONNX Runtime CPU session; ``level`` "all" (every fusion, as deployed) or "basic" (the reference
    semantics of the ONNX ops: constant folding and redundancy removal, no quantized-kernel fusion)."""
    options = ort.SessionOptions()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    options.graph_optimization_level = levels[level]
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_ort(session, inputs: tuple) -> list[np.ndarray]:
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs, strict=False)}
    return session.run(None, feeds)


def verify_in_ort(model: torch.nn.Module, inputs: tuple, path: str, level: str = "all",
                  cpu: str | None = None) -> float:
    """Worst SQNR (dB) over the outputs of ONNX Runtime (run as the CPU target ``cpu``; None: this machine)
    against the fake-quant model's on ``inputs``."""
    with torch.no_grad():
        expected = [t for _, t in flat_outputs(model(*clones(inputs)))]
    try:
        got = run_as(cpu, path, [x.detach().cpu().numpy() for x in inputs if isinstance(x, torch.Tensor)], level)
    except FxQuantError:
        raise
    except Exception as exc:  # ORT refuses a valid ONNX graph (a kernel it lacks for these types)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"ONNX Runtime cannot run the exported model, though onnx.checker accepts it: "
                          f"{type(exc).__name__}: {first[-300:]}. The ops or types it names have no ONNX Runtime "
                          "kernel (16-bit Q/DQ runs only where ONNX Runtime implements it): quantize them to 8 bits "
                          "or leave them float (Override), or pass verify=False to write the file unchecked for "
                          "another runtime") from exc
    if len(got) != len(expected):
        raise ConversionError(f"the ONNX model has {len(got)} outputs but the torch model returns {len(expected)}")
    return min(sqnr(e, torch.from_numpy(np.asarray(g))) for e, g in zip(expected, got, strict=True))
