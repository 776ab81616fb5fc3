"""Public pipeline: prepare -> calibrate -> convert (-> export_onnx); quantize does the first three."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable

import torch
from torch import fx, nn

from fxquant.backends import Backend, get_backend
from fxquant.calib import distributed as dist_calib
from fxquant.calib.batches import ModelBatches, Selector
from fxquant.errors import CalibrationError, ConfigError, ConfigTypeError, ConversionError
from fxquant.lower.exact.convert import check_exact, convert_exact
from fxquant.lower.frozen import freeze
from fxquant.pipeline import calibrate_model, prepare_model, record
from fxquant.ptq.adaround import learn_rounding
from fxquant.ptq.bias_correction import correct_layer_biases
from fxquant.ptq.int32_bias import bias_sites, widen_for_int32_bias
from fxquant.ptq.step import StepResult
from fxquant.quantizer import quantizers_of
from fxquant.report import PrepareReport, PTQReport
from fxquant.spec import CALIB_METHODS, AdaRoundOptions, QuantConfig
from fxquant.state import attach_state, exclusive, get_state
from fxquant.validate.config import check_before_trace
from fxquant.validate.model import check_model


def prepare(model: nn.Module, example_inputs: torch.Tensor | tuple, backend: str | Backend = "tensorrt",
            config: QuantConfig | None = None, dynamic_shapes: object = None) -> nn.Module:
    """Trace a copy of ``model`` (in eval mode), fold BatchNorm and insert quantizers for ``backend``.

    The user's model is never modified. Returns a GraphModule whose quantizers calibrate with
    ``calibrate``; ``fxquant.report_of(prepared)`` tells what was quantized and what stayed float and why.
    Code torch.fx cannot trace runs eagerly: the result is then the model's own module tree with its traceable
    parts as GraphModules and the Conv/Linear layers called from eager code swapped for quantized twins
    (``QuantConfig.strict=True`` raises a TraceError instead). The pass order is ``fxquant.pipeline``.
    For quantization-aware training use ``fxquant.prepare_qat`` (same arguments).

    The result runs at any batch size and, where the model allows, any sequence length or image size: a size of
    1 in the example does not fix that size. ``dynamic_shapes`` declares the dynamic axes as torch.export takes
    them (one entry per example input, e.g. ``({0: Dim("batch"), 1: Dim("seq")}, {0: Dim("batch"), 1:
    Dim("seq")})``; axes not named are static); export_onnx keeps them dynamic. A model captured with
    torch.export checks every call against the sizes its graph holds and raises ``InputShapeError`` outside them.
    """
    backend, config = checked_arguments(model, backend, config, qat=False)
    return prepare_model(model, example_inputs, backend, config, dynamic_shapes)


def checked_arguments(model: nn.Module, backend: str | Backend, config: QuantConfig | None,
                      qat: bool) -> tuple[Backend, QuantConfig]:
    """Validate prepare's arguments; returns the backend object and the config in force."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"prepare() takes an nn.Module, got {type(model).__name__}")
    backend = get_backend(backend)
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigTypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    for spec in (config.weight, config.activation, *(s for o in config.overrides for s in (o.weight, o.activation))):
        if spec is not None and not spec.fake_quant:
            raise ConfigError("specs used in a model must have fake_quant=True (fake_quant=False returns integer "
                              "codes, which the next layer cannot consume)")
        if spec is not None and spec.learn_amax and not qat:
            raise ConfigError("QuantSpec.learn_amax=True trains the range, which only quantization-aware training "
                              "does: use fxquant.prepare_qat(...) with the same arguments, or learn_amax=False")
    if config.target is not None and backend.runtime != "onnxruntime":
        raise ConfigError(f"QuantConfig.target={config.target!r} chooses ONNX Runtime's CPU int8 kernels, which the "
                          f"{backend.name} backend does not deploy to: drop the target, or use an ONNX Runtime "
                          "backend (onnxruntime, onnxruntime_dynamic)")
    if qat and config.bias_correction == "auto":  # training moves the biases itself
        config = dataclasses.replace(config, bias_correction=False)
    check_model(model, qat)  # not fxquant's own output, no pruning hooks (fxquant.validate)
    check_before_trace(model, config)
    return backend, config


def report_of(model: nn.Module) -> PrepareReport:
    """The prepare report of a model returned by prepare/calibrate/convert/quantize."""
    state = get_state(model)
    if state is None:
        raise ConfigTypeError("report_of() takes a model returned by fxquant.prepare/convert/quantize")
    return state.report


def calibrate(prepared: nn.Module, batches: Iterable, progress: bool = True, inputs: Selector = None,
              distributed: bool | None = None) -> nn.Module:
    """Run ``batches`` through ``prepared`` in eval mode and freeze each quantizer's range from the data.

    ``batches``: an iterable of tensors, tuples of tensors (one per forward argument), NumPy arrays or dicts
    keyed by the forward's argument names. ``inputs`` selects the model inputs from each batch: an index
    (``inputs=0`` for the ``(x, y)`` pairs of ``DataLoader(TensorDataset(x, y))``), a dict key, a tuple of
    those, or a function ``batch -> inputs``; a batch with more items than the forward takes raises instead of
    being cut down. Every batch is checked (0 samples, NaN/Inf, the example's dtype; a failing forward names
    the batch index), and all-zero data raises. If calibration fails, the model's ranges are cleared (convert
    then asks for a calibration) rather than left from an earlier run. Returns ``prepared``.
    Under torch.distributed (initialized), every rank calibrates its own batches and the statistics are merged
    so that all ranks get the same ranges; see ``fxquant.calib.distributed``. ``distributed=False`` calibrates
    on this rank alone (e.g. under ``if rank == 0:``); a rank that calls calibrate while the others do not raises
    after ``FXQUANT_ARRIVAL_TIMEOUT_S`` seconds instead of hanging.
    When the config asks for AdaRound or empirical bias correction, they run afterwards on the same batches
    (read again, or kept in a list when ``batches`` is a one-shot iterator); weights AdaRound rounded keep their
    ranges when calibrate() runs again. The steps, in order: ``fxquant.pipeline.calibrate.STEPS``.
    """
    state = get_state(prepared)
    if state is not None and state.stage == "converted":
        raise CalibrationError("this model is already converted (its ranges are frozen); calibrate the prepared "
                               "model before convert()")
    if state is None:
        raise CalibrationError("this model has no fxquant quantizers; call fxquant.prepare(model, example_inputs) "
                               "and calibrate what it returns")
    if not quantizers_of(prepared):
        raise CalibrationError(_nothing_to_calibrate(state.report))
    data = ModelBatches(batches, prepared, inputs)
    merge = dist_calib.is_distributed() if distributed is None else bool(distributed)
    if merge and not dist_calib.is_distributed():
        raise CalibrationError("calibrate(distributed=True) needs torch.distributed initialized "
                               "(dist.init_process_group) on every rank")
    with exclusive(state, "calibrate()"):  # another thread calibrating this model: an error, not mixed ranges
        return calibrate_model(prepared, data, progress, merge)


def adaround(prepared: nn.Module, batches: Iterable, options: AdaRoundOptions | None = None,
             progress: bool = True) -> PTQReport:
    """Learn the rounding of every quantized weight of a calibrated ``prepared`` model, in place (AdaRound).

    ``batches`` is re-read once per layer (a list is best). Returns the report (also in
    ``fxquant.report_of(prepared).ptq['adaround']``); ``report.data['codes']`` holds each layer's integer codes.
    """
    return record(get_state(prepared), "adaround", learn_rounding(prepared, batches, options, progress))


def correct_bias(prepared: nn.Module, batches: Iterable | None = None, method: str = "empirical",
                 progress: bool = True) -> PTQReport:
    """Correct the biases of a calibrated ``prepared`` model in place (``method``: "empirical" with
    ``batches``, "input_means" with ``batches`` (one float pass), or "analytical" from BatchNorm statistics).
    Returns the report (also in
    ``fxquant.report_of(prepared).ptq['bias_correction']``)."""
    report = correct_layer_biases(prepared, batches, method, progress)
    return record(get_state(prepared), "bias_correction", StepResult(report))


def _nothing_to_calibrate(report: PrepareReport) -> str:
    ops = [*report.quantized, *report.passthrough, *report.float_ops]
    shown = ", ".join(f"{e.node} ({e.kind})" for e in ops[:8]) + (f" and {len(ops) - 8} more" if len(ops) > 8 else "")
    return (f"prepare() put no quantizer in this model: for the {report.backend} backend none of its ops "
            f"({shown or 'it has none'}) needs one (pass-through, float, or scale-sharing ops with no quantized "
            "neighbour; fxquant.report_of(prepared) lists each with its rule or reason), so there is nothing to "
            "calibrate. Quantize a model with ops the backend quantizes (Conv, Linear, MatMul, ...), or check the "
            "config's Override exclusions")


def load_calib_amax(prepared: nn.Module, method: str, percentile: float | None = None) -> nn.Module:
    """Re-derive every quantizer's range with ``method`` from the statistics calibration already collected.

    Quantizers calibrated with a histogram method (percentile, entropy, mse) can switch among those and
    "max" without running data again; others keep their range and are listed in a warning.
    """
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("load_calib_amax() needs a model that fxquant.calibrate() has run on")
    if method not in CALIB_METHODS:
        raise ConfigError(f"unknown calib method {method!r}; valid methods: {sorted(CALIB_METHODS)}")
    quantizers = quantizers_of(prepared)
    if any(q.spec.amax is None and q.calibrator.num_batches == 0 for q in quantizers.values()):
        raise CalibrationError("load_calib_amax() re-derives ranges from calibration statistics, but this model's "
                               "ranges were loaded (load_encodings/load_state_dict), not calibrated here; run "
                               "fxquant.calibrate(prepared, batches) first")
    kept = []
    for name, q in quantizers.items():
        if q.spec.amax is not None or method not in q.calibrator.methods:
            kept.append(name)
            continue
        # the spec records the method (and percentile) in use: save_encodings and the ONNX metadata report it
        q.spec = q.spec.with_(calib_method=method, **({} if percentile is None else {"percentile": percentile}))
        q.load_calib_amax(method)
    if kept:
        warnings.warn(f"{len(kept)} quantizer(s) keep their range (fixed amax, or statistics that cannot give "
                      f"{method!r}): {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}", stacklevel=2)
    return prepared


def convert(prepared: nn.Module, exact: str | None = None,
            example_inputs: torch.Tensor | tuple | None = None) -> nn.Module:
    """A copy of the calibrated model with every quantizer frozen into a Q/DQ op (exportable to ONNX); a
    GraphModule when the model was traced whole.

    ``exact="vnni"`` or ``"avx2"`` (ONNX Runtime backends) returns instead a model that computes what ONNX
    Runtime's CPU kernels compute on that CPU (``QuantConfig.target`` explains the two), bit for bit wherever ORT
    runs the graph in its integer kernels, and as close as torch allows in its float kernels
    (docs/deploy-exact.md): evaluate it to know the deployed accuracy. It exports to the same QDQ ONNX, and
    ``export_onnx`` counts the outputs ORT computes differently and names the first differing tensor.
    ``example_inputs`` (default: prepare's) is what the model is exported with to let ORT build its graph.
    """
    state = get_state(prepared)
    if state is None:
        raise ConversionError("convert() takes the model returned by fxquant.prepare() (after calibrate())")
    if state.stage == "converted":
        raise ConversionError("this model is already converted")
    missing = [name for name, q in quantizers_of(prepared).items() if not q.is_calibrated and q.mode != "disabled"]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConversionError(f"{len(missing)} quantizer(s) have no range yet ({shown}); run "
                              "fxquant.calibrate(prepared, batches) before convert()")
    if exact is not None:
        check_exact(exact, state.backend)
    qmodel = copy.deepcopy(prepared).eval()
    sites = bias_sites(qmodel) if "int32_bias" in state.backend.export_passes else []
    for name, q in list(quantizers_of(qmodel).items()):
        qmodel.set_submodule(name, freeze(q).eval())
    report = dataclasses.replace(state.report, ptq=dict(state.report.ptq))
    widened = widen_for_int32_bias(qmodel, sites)
    if widened.done:
        report.ptq[widened.name] = widened
    attach_state(qmodel, dataclasses.replace(state, stage="converted", report=report))
    for m in qmodel.modules():  # the root, or the traced parts of a model that could not be traced whole
        if isinstance(m, fx.GraphModule):
            m.recompile()
    if exact is None:
        return qmodel
    return convert_exact(qmodel, exact, state.example_inputs if example_inputs is None else example_inputs)


def quantize(model: nn.Module, example_inputs: torch.Tensor | tuple, batches: Iterable,
             backend: str | Backend = "tensorrt", config: QuantConfig | None = None,
             progress: bool = True, inputs: Selector = None, dynamic_shapes: object = None) -> fx.GraphModule:
    """prepare + calibrate + convert in one call; returns the fake-quant GraphModule (``inputs``: as calibrate's,
    ``dynamic_shapes``: as prepare's)."""
    prepared = prepare(model, example_inputs, backend=backend, config=config, dynamic_shapes=dynamic_shapes)
    calibrate(prepared, batches, progress=progress, inputs=inputs)
    return convert(prepared)
