"""Public pipeline: prepare -> calibrate -> convert (-> export_onnx); quantize does the first three."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from functools import partial

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.backends import BACKENDS, Backend, get_backend
from fxquant.backends.saturation import choose_weight_bits
from fxquant.calib import CALIBRATORS
from fxquant.capture import normalize_inputs, propagate_shapes
from fxquant.errors import CalibrationError, ConversionError
from fxquant.hybrid import attach_state, prepare_parts
from fxquant.lower.frozen import FrozenQuantizer
from fxquant.passes.annotate import Annotations, annotate_pass
from fxquant.passes.decompose_attention import decompose_attention
from fxquant.passes.einsum_matmul import einsum_to_matmul
from fxquant.passes.fold_bn import fold_bn
from fxquant.passes.insert import insert_quantizers
from fxquant.passes.manager import PassResult, run_passes
from fxquant.passes.window_attention import inline_window_attention
from fxquant.ptq import pipeline as ptq
from fxquant.ptq.adaround import FIXED_KEY
from fxquant.quantizer import TensorQuantizer
from fxquant.report import OpEntry, PrepareReport
from fxquant.rules import GraphView
from fxquant.spec import QuantConfig
from fxquant.state import QuantState, get_state


def _insert_pass(gm: fx.GraphModule) -> PassResult:
    return insert_quantizers(gm, gm.meta["fxquant_annotations"])


def prepare(model: nn.Module, example_inputs: torch.Tensor | tuple, backend: str | Backend = "tensorrt",
            config: QuantConfig | None = None) -> nn.Module:
    """Trace a copy of ``model`` (in eval mode), fold BatchNorm and insert quantizers for ``backend``.

    The user's model is never modified. Returns a GraphModule whose quantizers calibrate with
    ``calibrate``; ``fxquant.report_of(prepared)`` tells what was quantized and what stayed float and why.
    Code torch.fx cannot trace runs eagerly: the result is then the model's own module tree with its traceable
    parts as GraphModules and the Conv/Linear layers called from eager code swapped for quantized twins
    (``QuantConfig.strict=True`` raises a TraceError instead).
    For quantization-aware training use ``fxquant.prepare_qat`` (same arguments).
    """
    return _prepare(model, example_inputs, backend, config, qat=False)


def _prepare(model: nn.Module, example_inputs: torch.Tensor | tuple, backend: str | Backend,
             config: QuantConfig | None, qat: bool) -> fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() takes an nn.Module, got {type(model).__name__}")
    backend = get_backend(backend)
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    for spec in (config.weight, config.activation, *(s for o in config.overrides for s in (o.weight, o.activation))):
        if spec is not None and not spec.fake_quant:
            raise ValueError("specs used in a model must have fake_quant=True (fake_quant=False returns integer "
                             "codes, which the next layer cannot consume)")
        if spec is not None and spec.learn_amax and not qat:
            raise ValueError("QuantSpec.learn_amax=True trains the range, which only quantization-aware training "
                             "does: use fxquant.prepare_qat(...) with the same arguments, or learn_amax=False")
    if config.rules:
        backend = backend.with_rules(*config.rules)
    inputs = normalize_inputs(example_inputs)
    work = copy.deepcopy(model).eval()  # PTQ: BatchNorm uses running statistics and can be folded

    def prepare_graph(gm: fx.GraphModule, unit_inputs: tuple) -> tuple[fx.GraphModule, PrepareReport]:
        propagate_shapes(gm, unit_inputs)
        passes = [("decompose_attention", partial(decompose_attention, example_inputs=unit_inputs)),
                  ("inline_window_attention", partial(inline_window_attention, example_inputs=unit_inputs)),
                  ("einsum_to_matmul", partial(einsum_to_matmul, example_inputs=unit_inputs))]
        if config.fold_bn:
            passes += ptq.before_fold(config)
            passes.append(("fold_bn", partial(fold_bn, strict=config.strict)))
        passes += ptq.after_fold(config)  # equalization, bias absorption (QuantConfig.equalize / absorb_bias)
        passes += [("annotate", partial(annotate_pass, backend=backend, config=config)),
                   ("insert_quantizers", _insert_pass)]
        gm, results = run_passes(gm, passes)
        return gm, _report(gm, backend, gm.meta.pop("fxquant_annotations"), results)

    # the traced parts (the whole model when torch.fx can trace it) and what runs eagerly: fxquant.hybrid
    root, report = prepare_parts(work, inputs, backend, config, prepare_graph)
    attach_state(root, QuantState(backend.name, config, "prepared", report))
    if report.float_ops:
        warnings.warn(f"{len(report.float_ops)} op(s) stay float:\n" +
                      "\n".join(f"  {e.node} ({e.kind}): {e.detail}" for e in report.float_ops), stacklevel=3)
    if report.eager:
        warnings.warn(f"{len(report.eager)} module(s) run eagerly (not traced); their Conv/Linear layers are "
                      "quantized by module swap:\n" + "\n".join(f"  {e.node or '<root>'} ({e.kind}): {e.detail}"
                                                                  for e in report.eager), stacklevel=3)
    return root


def _report(gm: fx.GraphModule, backend: Backend, ann: Annotations, results: dict[str, PassResult]) -> PrepareReport:
    kinds = GraphView(gm).kinds
    report = PrepareReport(backend.name)
    report.quantized = [OpEntry(n.name, kinds.get(n, "?"), rule) for n, rule in ann.quantized.items()]
    report.passthrough = [OpEntry(n.name, kinds.get(n, "?"), "pass-through") for n in ann.passthrough]
    report.float_ops = [OpEntry(n.name, kinds.get(n, "?"), why) for n, why in ann.floats.items()]
    report.folded_bn = [n.meta["fxquant"]["folded_bn"]["bn"] for n in gm.graph.nodes
                        if "folded_bn" in n.meta.get("fxquant", {})]
    report.skipped = [note for r in results.values() for note in r.notes]
    report.ptq.update(gm.meta.pop("fxquant_ptq", {}))
    quantizers = _quantizers(gm)
    report.weight_quantizers = sum(1 for q in quantizers.values() if q.constant)
    report.activation_quantizers = len(quantizers) - report.weight_quantizers
    return report


def report_of(model: nn.Module) -> PrepareReport:
    """The prepare report of a model returned by prepare/calibrate/convert/quantize."""
    state = get_state(model)
    if state is None:
        raise TypeError("report_of() takes a model returned by fxquant.prepare/convert/quantize")
    return state.report


def _quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _check_finite(batch: tuple, index: int) -> None:
    for t in batch:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf values; clean the data "
                                   "(every batch is checked before it reaches the quantizers)")


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable, progress: bool = True) -> nn.Module:
    """Run ``batches`` through ``prepared`` in eval mode and freeze each quantizer's range from the data.

    ``batches``: an iterable of tensors or tuples of tensors (one per forward argument). Returns ``prepared``.
    Under torch.distributed (initialized), every rank calibrates its own batches and the statistics are merged
    so that all ranks get the same ranges; see ``fxquant.calib.distributed``.
    When the config asks for AdaRound or empirical bias correction, they run afterwards on the same batches
    (kept in a list); weights AdaRound rounded keep their ranges when calibrate() runs again.
    """
    from fxquant.calib import distributed  # local: the distributed hook is part of calibrate only

    state = get_state(prepared)
    quantizers = _quantizers(prepared)
    if state is not None and state.stage == "converted":
        raise CalibrationError("this model is already converted (its ranges are frozen); calibrate the prepared "
                               "model before convert()")
    if state is None or not quantizers:
        raise CalibrationError("this model has no fxquant quantizers; call fxquant.prepare(model, example_inputs) "
                               "and calibrate what it returns")
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
                        "not a single tensor; wrap it: [tensor]")
    if ptq.needs_data(state.config):
        batches = list(batches)
    was_training = prepared.training
    prepared.eval()
    user_disabled = {name for name, q in quantizers.items() if q.mode == "disabled"}  # they stay disabled
    fixed = prepared.meta.get(FIXED_KEY, set())  # weights AdaRound rounded: their range fixes their codes
    quantizers = {name: q for name, q in quantizers.items() if name not in user_disabled | fixed}
    for q in quantizers.values():
        q.calibrator.reset()
        q.set_mode("calib")
    constants = [q for q in quantizers.values() if q.constant]  # weights, layer scales: the same every batch
    count = 0
    try:
        for i, batch in enumerate(tqdm(batches, desc="fxquant calibrate", unit="batch", disable=not progress)):
            batch = normalize_inputs(batch)
            _check_finite(batch, i)
            prepared(*batch)
            if count == 0:  # constants are the same in every batch: their statistics are complete after one
                for q in constants:
                    q.set_mode("disabled")
            count += 1
        if distributed.is_distributed():  # merge every rank's statistics: all ranks get the same ranges
            count = distributed.sync_calibrators(quantizers, count, device=distributed.module_device(prepared))
        if count == 0:
            raise CalibrationError("the calibration iterable was empty; pass at least one batch")
        for name, q in quantizers.items():
            if q.spec.amax is None and q.calibrator.num_batches == 0:
                raise CalibrationError(f"quantizer `{name}` saw no data during calibration: the branch it sits "
                                       "on never ran for these batches")
            try:
                q.load_calib_amax()
            except ValueError as exc:
                raise CalibrationError(f"quantizer `{name}`: {exc}") from exc
    finally:
        for q in quantizers.values():
            q.set_mode("quant")
        prepared.train(was_training)
    state.stage = "calibrated"
    backend = state.backend if isinstance(state.backend, Backend) else BACKENDS.get(state.backend)
    if backend is not None:  # AdaRound may move each code by one: keep two codes of headroom per pair
        choose_weight_bits(prepared, backend, state.config, fixed, margin=2 if state.config.adaround_options else 0)
    ptq.after_calibrate(prepared, batches, state.config, progress)
    return prepared


def load_calib_amax(prepared: nn.Module, method: str, percentile: float | None = None) -> nn.Module:
    """Re-derive every quantizer's range with ``method`` from the statistics calibration already collected.

    Quantizers calibrated with a histogram method (percentile, entropy, mse) can switch among those and
    "max" without running data again; others keep their range and are listed in a warning.
    """
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("load_calib_amax() needs a model that fxquant.calibrate() has run on")
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calib method {method!r}; valid methods: {sorted(CALIBRATORS)}")
    quantizers = _quantizers(prepared)
    if any(q.spec.amax is None and q.calibrator.num_batches == 0 for q in quantizers.values()):
        raise CalibrationError("load_calib_amax() re-derives ranges from calibration statistics, but this model's "
                               "ranges were loaded (load_encodings/load_state_dict), not calibrated here; run "
                               "fxquant.calibrate(prepared, batches) first")
    kept = []
    for name, q in quantizers.items():
        if q.spec.amax is not None or method not in q.calibrator.methods:
            kept.append(name)
            continue
        if percentile is not None:
            q.spec = q.spec.with_(percentile=percentile)
        q.load_calib_amax(method)
    if kept:
        warnings.warn(f"{len(kept)} quantizer(s) keep their range (fixed amax, or statistics that cannot give "
                      f"{method!r}): {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}", stacklevel=2)
    return prepared


def convert(prepared: nn.Module) -> nn.Module:
    """A copy of the calibrated model with every quantizer frozen into a Q/DQ op (exportable to ONNX); a
    GraphModule when the model was traced whole."""
    state = get_state(prepared)
    if state is None:
        raise ConversionError("convert() takes the model returned by fxquant.prepare() (after calibrate())")
    if state.stage == "converted":
        raise ConversionError("this model is already converted")
    missing = [name for name, q in _quantizers(prepared).items() if not q.is_calibrated and q.mode != "disabled"]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConversionError(f"{len(missing)} quantizer(s) have no range yet ({shown}); run "
                              "fxquant.calibrate(prepared, batches) before convert()")
    qmodel = copy.deepcopy(prepared).eval()
    for name, q in list(_quantizers(qmodel).items()):
        frozen = nn.Identity() if q.mode == "disabled" else FrozenQuantizer(q, q.constant)
        qmodel.set_submodule(name, frozen)
    qmodel.meta["fxquant"] = QuantState(state.backend, state.config, "converted", state.report)
    for m in qmodel.modules():  # the root, or the traced parts of a model that could not be traced whole
        if isinstance(m, fx.GraphModule):
            m.recompile()
    return qmodel


def quantize(model: nn.Module, example_inputs: torch.Tensor | tuple, batches: Iterable,
             backend: str | Backend = "tensorrt", config: QuantConfig | None = None,
             progress: bool = True) -> fx.GraphModule:
    """prepare + calibrate + convert in one call; returns the fake-quant GraphModule."""
    prepared = prepare(model, example_inputs, backend=backend, config=config)
    calibrate(prepared, batches, progress=progress)
    return convert(prepared)
