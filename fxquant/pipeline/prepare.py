"""The prepare pipeline, in order, in one place (calibrate's is ``fxquant.pipeline.calibrate``).

``prepare_model`` captures a copy of the model (whole, or in traced parts with the rest eager), runs
``prepare_graph`` on every traced part, quantizes the Conv/Linear layers eager code calls, and records the
backend, config and report on the result. ``prepare_graph`` is the ordered pass list; each pass is a function
``(gm, ...) -> PassResult`` (``fxquant.passes.manager``) and hands what it produced to the next by return value.
prepare, prepare_qat and the partial-trace path all go through here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn

from fxquant.backends.base import Backend
from fxquant.backends.runtime import check_specs
from fxquant.calib.batches import forward_arity
from fxquant.capture.inplace import has_inplace_ops
from fxquant.capture.partition import TracedPart, partition
from fxquant.capture.shapes import attach_shapes, declared_dims, declared_shapes, shapes_of
from fxquant.capture.trace import normalize_inputs, propagate_shapes
from fxquant.errors import ExampleInputError, PassError
from fxquant.passes import decompose_attention, decompose_sdpa, einsum_matmul, window_attention
from fxquant.passes.additive_mask import fold_additive_masks, has_softmax
from fxquant.passes.annotate import annotate_pass
from fxquant.passes.fold_bn import fold_bn
from fxquant.passes.fold_pad import fold_pad, has_pads
from fxquant.passes.functionalize import functionalize
from fxquant.passes.hybrid import part_notes, quantize_eager_code
from fxquant.passes.insert import insert_quantizers
from fxquant.passes.manager import PassRunner
from fxquant.ptq.bias_absorption import absorb_high_bias
from fxquant.ptq.bias_correction import record_expected_inputs
from fxquant.ptq.bn_stats import record_bn_stats
from fxquant.ptq.equalize import equalize
from fxquant.ptq.relu6 import through_relu6
from fxquant.report import PrepareReport, graph_report
from fxquant.spec import QuantConfig
from fxquant.state import QuantState, attach_state
from fxquant.validate.config import check_overrides
from fxquant.validate.model import freeze_parametrizations, warn_dropped_hooks

Observer = Callable[[str, fx.GraphModule], None]


def prepare_graph(gm: fx.GraphModule, inputs: tuple, backend: Backend, config: QuantConfig,
                  observer: Observer | None = None) -> tuple[fx.GraphModule, PrepareReport]:
    """Run the prepare passes on one traced graph, in this order; ``observer(pass_name, gm)`` sees the graph
    after each pass (docs/architecture.md is generated with it)."""
    run = PassRunner(gm, observer)
    if has_inplace_ops(gm):
        run(functionalize)  # y.relu_(), F.relu(y, inplace=True), ...: out of place, later readers read the result
    propagate_shapes(run.gm, inputs)  # tensor shapes and dtypes on every node: rules and passes read them
    # graph rewrites that expose quantizable ops, each only where its target op is present
    if _calls(gm, decompose_attention.TARGET):
        run(decompose_attention.decompose_attention, inputs)
    if _calls(gm, decompose_sdpa.TARGET):
        run(decompose_sdpa.decompose_sdpa, inputs)
    if _calls(gm, window_attention.TARGET):
        run(window_attention.inline_window_attention, inputs)
    if _calls(gm, einsum_matmul.TARGET):
        run(einsum_matmul.einsum_to_matmul, inputs)
    if has_softmax(gm):
        run(fold_additive_masks)  # softmax(scores + a mask from the inputs): the mask add stays float
    ptq = {}
    if has_pads(gm):
        run(fold_pad)  # explicit zero pads into the convolutions they feed, where the conv's padding can say it
    if config.fold_bn:
        if config.equalize or config.absorb_bias or config.bias_correction_method == "analytical":
            run(record_bn_stats)  # BatchNorm statistics, kept past folding for the data-free PTQ passes
        run(fold_bn, strict=config.strict)
    if config.equalize:
        ptq["equalize"] = run(equalize, relu6_as_relu=through_relu6(config, backend), example_inputs=inputs)
    if config.absorb_bias:
        ptq["bias_absorption"] = run(absorb_high_bias)
    if config.bias_correction_method == "analytical":
        run(record_expected_inputs)  # calibrate() corrects biases from these after calibration
    annotations = run(annotate_pass, backend, config)  # the backend's rules decide; the graph is unchanged
    run(insert_quantizers, annotations)  # the one pass that acts on the decisions
    return run.gm, graph_report(run.gm, backend.name, annotations, run.notes, ptq)


def prepare_model(model: nn.Module, example_inputs: torch.Tensor | tuple, backend: Backend,
                  config: QuantConfig, dynamic_shapes: object = None) -> nn.Module:
    """Capture a copy of ``model`` (eval mode), prepare every traced part, quantize eager layers by swap.
    ``dynamic_shapes``: the axes the user declares dynamic, in torch.export's form (``fxquant.capture.shapes``)."""
    runtime_notes = check_specs(backend.runtime, backend.name, config,
                                {"weight": backend.weight, "activation": backend.activation})
    inputs = normalize_inputs(example_inputs)
    arguments = forward_arity(model)[0]
    declared = declared_dims(dynamic_shapes, arguments, inputs)
    work = copy.deepcopy(model).eval()  # PTQ: BatchNorm uses running statistics and can be folded
    frozen = freeze_parametrizations(work)  # weight_norm & co: quantize the weight the model computes with
    parts = partition(work, inputs, config, declared)  # the whole model as one traced part when torch.fx traces it
    root: nn.Module = work
    report = PrepareReport(backend.name)
    shapes = None
    for part in parts.traced:
        if not part.path:
            shapes = shapes_of(part.gm)  # a torch.export capture: its dynamic axes and guards
        gm, part_report = _prepare_part(part, backend, config)
        if part.path:
            work.set_submodule(part.path, gm)
        else:
            root = gm
        report.absorb(part_report, part.path)
        report.traced.append(part.path)
        report.notes += part_notes(part)
    quantize_eager_code(work, parts, backend, config, report)
    report.skipped += [f"{name}: parametrization frozen to its current value" for name in frozen]
    check_overrides(model, root, config)  # globs that matched nothing raise (fxquant.validate)
    warn_dropped_hooks(model, root, report.folded_bn)
    report.count_quantizers(root)
    report.notes += runtime_notes
    example = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    attach_state(root, QuantState(backend, config, "prepared", report, example_inputs=example))
    attach_shapes(root, shapes or declared_shapes(declared, arguments))
    if runtime_notes:
        warnings.warn(f"{backend.name}: " + ";\n  ".join(runtime_notes), stacklevel=3)
    _warn(report)
    return root


def _prepare_part(part: TracedPart, backend: Backend, config: QuantConfig) -> tuple[fx.GraphModule, PrepareReport]:
    try:
        return prepare_graph(part.gm, part.inputs, backend, config)
    except ExampleInputError as exc:
        if not part.path:
            raise
        raise PassError(f"the traced `{part.path}` failed on the inputs it was called with ({exc}); keep it eager "
                        f"with QuantConfig(non_traceable=({part.path!r},))") from exc


def _calls(gm: fx.GraphModule, target: object) -> bool:
    """Whether ``gm`` calls the function ``target`` or a module of class ``target``."""
    if isinstance(target, type):
        return any(isinstance(m, target) for m in gm.modules())
    return any(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _warn(report: PrepareReport) -> None:
    if report.float_ops:
        warnings.warn(f"{len(report.float_ops)} op(s) stay float:\n" +
                      "\n".join(f"  {e.node} ({e.kind}): {e.detail}" for e in report.float_ops), stacklevel=4)
    if report.eager:
        warnings.warn(f"{len(report.eager)} module(s) run eagerly (not traced); their Conv/Linear layers are "
                      "quantized by module swap:\n" + "\n".join(f"  {e.node or '<root>'} ({e.kind}): {e.detail}"
                                                                  for e in report.eager), stacklevel=4)
