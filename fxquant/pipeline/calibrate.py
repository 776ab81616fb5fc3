"""The calibrate pipeline, in order, in one place.

``STEPS`` is calibrate()'s ordered list of steps; ``calibrate_model`` runs it on a prepared model. Every step
has one contract, ``(CalibrationContext) -> StepResult`` (``fxquant.ptq.step``, where adding a step is
explained), and the report and state are written here only (``record``), never from inside a step.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from fxquant.calib.batches import ModelBatches, clear_ranges, run_batch
from fxquant.errors import ConfigError
from fxquant.pipeline.ranges import collect_ranges, recollect_ranges
from fxquant.ptq import gptq
from fxquant.ptq.adaround import adaround_step, rounds
from fxquant.ptq.bias_correction import (
    bias_correction_step,
    corrects_bias,
    corrects_empirically,
    input_means_watch_step,
    watches_input_means,
)
from fxquant.ptq.outlier_channels import outlier_channels_step, split_watched, splits, watching
from fxquant.ptq.smoothquant import smoothquant_step, smooths
from fxquant.ptq.step import CalibrateStep, CalibrationContext, StepResult, always
from fxquant.ptq.weight_widths import saturation_aware, weight_bits_step
from fxquant.quantizer import TensorQuantizer, quantizers_of
from fxquant.report import PTQReport
from fxquant.state import QuantState, get_state

RANGES = CalibrateStep("ranges", collect_ranges)  # the calibrator loop: before it, steps change the model; after
# it, they see calibrated ranges


def _split_on_ranges(ctx: CalibrationContext) -> StepResult:
    """The outlier split decided on the activations of the ranges pass; the quantizers it changed collect again."""
    result, changed = split_watched(ctx)
    if changed:
        recollect_ranges(ctx, changed)
    return result


# the split where the ranges pass runs the float model: it decides on that pass's activations (no pass of its own)
SPLIT_ON_RANGES = CalibrateStep("outlier_channels", _split_on_ranges, applies=watching, reads_batches=always)

STEPS: tuple[CalibrateStep, ...] = (
    # data-driven changes of the model its ranges are then calibrated on; skipped under distributed calibration
    # (SmoothQuant's trigger, a LayerNorm feeding Linears, means a transformer that loses accuracy without it: a
    # warning; the split's, any Linear, also fits every CNN head, where a warning would be noise)
    CalibrateStep("smoothquant", smoothquant_step, applies=smooths, reads_batches=always,
                  distributed="skip_and_warn"),
    CalibrateStep("outlier_channels", outlier_channels_step, applies=splits, reads_batches=always, distributed="skip"),
    # GPTQ sums its layers' input moments in the ranges pass, then rounds after the weight widths are chosen
    CalibrateStep("gptq", gptq.gptq_watch_step, applies=gptq.applies, distributed="skip"),
    # bias correction from input means sums its layers' input channels in the ranges pass, corrects at the end
    CalibrateStep("bias_correction", input_means_watch_step, applies=watches_input_means, distributed="skip"),
    RANGES,
    SPLIT_ON_RANGES,
    CalibrateStep("weight_bits", weight_bits_step, applies=saturation_aware),  # ORT u8s8 saturation-safe codes
    CalibrateStep("gptq", gptq.gptq_step, applies=gptq.watching),
    CalibrateStep("adaround", adaround_step, applies=rounds, reads_batches=always),
    CalibrateStep("bias_correction", bias_correction_step, applies=corrects_bias, reads_batches=corrects_empirically),
)


def calibrate_model(prepared: nn.Module, data: ModelBatches, progress: bool, distributed: bool) -> nn.Module:
    """Run ``STEPS`` on ``prepared`` (checked by ``fxquant.calibrate``) over the checked batches ``data``, under
    no_grad, in eval mode up to the ranges. A failure up to the ranges clears every range this calibration sets
    (convert then asks for a calibration) rather than leaving those of an earlier run."""
    state = get_state(prepared)
    ctx = CalibrationContext(prepared, data, lambda i, batch: run_batch(prepared, batch, i, data.expected), state,
                             _calibrated_quantizers(prepared, state), distributed, progress, data)
    split = STEPS.index(SPLIT_ON_RANGES) + 1  # up to here quantizers collect (in eval mode); then they quantize
    was_training = prepared.training
    prepared.eval()
    with torch.no_grad():
        for q in ctx.quantizers.values():
            q.calibrator.reset()
            q.set_mode("calib")
        try:
            if isinstance(data.batches, Iterator) and any(_runs(step, ctx) and step.reads_batches(ctx)
                                                          for step in STEPS):
                ctx.batches = list(ctx.batches)  # a one-shot iterator read more than once: keep the model inputs
            for step in STEPS[:split]:
                _run(step, ctx)
        except BaseException:
            clear_ranges(ctx.quantizers.values(), state)  # a failed re-calibration must not leave the old ranges
            raise
        finally:
            ctx.hooks.close()
            for q in ctx.quantizers.values():
                q.set_mode("quant")
            prepared.train(was_training)
        state.stage = "calibrated"
        for step in STEPS[split:]:
            _run(step, ctx)
    return prepared


def record(state: QuantState, name: str, result: StepResult) -> PTQReport | None:
    """Write what a step did into the model's report and state (the one place that does); returns its report."""
    if result.report is not None:
        state.report.ptq[name] = result.report
    state.report.skipped += result.notes
    state.fixed_weights |= result.fixed_weights
    return result.report


def _calibrated_quantizers(prepared: nn.Module, state: QuantState) -> dict[str, TensorQuantizer]:
    """The quantizers calibrate sets: not those the user disabled (they stay disabled), not weights whose codes
    AdaRound fixed (their range fixes their codes), not dynamic ones (each forward takes its own range)."""
    quantizers = quantizers_of(prepared)
    left = {name for name, q in quantizers.items() if q.mode == "disabled"} | state.fixed_weights
    return {name: q for name, q in quantizers.items() if name not in left and not q.spec.dynamic}


def _runs(step: CalibrateStep, ctx: CalibrationContext) -> bool:
    return step.applies(ctx) and not (ctx.distributed and step.distributed != "run")


def _run(step: CalibrateStep, ctx: CalibrationContext) -> None:
    if not step.applies(ctx):
        return
    if ctx.distributed and step.distributed != "run":
        _skip_on_ranks(step, ctx)
        return
    record(ctx.state, step.name, step.run(ctx))


def _skip_on_ranks(step: CalibrateStep, ctx: CalibrationContext) -> None:
    """A step that decides from each rank's own batches would change the ranks' models differently: "auto"
    skips it with a report note (and a warning where the step asks), True raises."""
    option = step.option or step.name
    why = (f"{option} decides from each rank's own calibration batches, so the ranks would change their models "
           "differently")
    fix = (f"calibrate on one rank (fxquant.calibrate(..., distributed=False) under `if rank == 0`) to run it, or set "
           f"QuantConfig({option}=False)")
    if getattr(ctx.config, option) is True:
        raise ConfigError(f"QuantConfig({option}=True) under distributed calibration: {why}; {fix}")
    note = f"{option} skipped under distributed calibration: {why}; {fix}"
    record(ctx.state, step.name, StepResult(notes=[note]))
    if step.distributed == "skip_and_warn":
        warnings.warn(note, stacklevel=5)  # _skip_on_ranks, _run, calibrate_model, fxquant.calibrate, the caller
