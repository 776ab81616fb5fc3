"""The one contract of calibrate-time passes: a step takes a ``CalibrationContext`` and returns a ``StepResult``.

calibrate()'s order is the tuple ``fxquant.pipeline.calibrate.STEPS``; ``calibrate_model`` runs it. To add a step:

1. write one function ``my_step(ctx: CalibrationContext) -> StepResult`` beside the pass it runs (e.g. in
   ``fxquant/ptq/my_pass.py``). It changes ``ctx.model`` in place, runs batches only through ``ctx.run(i, batch)``
   (errors then name the batch), reads options from ``ctx.config`` / ``ctx.backend``, and returns what it did:
   ``StepResult(report=PTQReport("my_pass", done=[...], skipped=[...]))``. It never writes the model's report or
   state itself: the pipeline records ``result.report`` as ``report_of(model).ptq[step.name]``, appends
   ``result.notes`` to the report's ``skipped`` lines and adds ``result.fixed_weights`` to the weights later
   calibrations leave alone. Raise an ``FxQuantError`` subclass whose message says what to do;
2. add one line to ``STEPS`` where it belongs:
   ``CalibrateStep("my_pass", my_step, applies=lambda ctx: ctx.config.my_option, reads_batches=always)``
   (``fxquant.ptq.step.always``; leave ``reads_batches`` out for a step that runs no batch).

Where a step sits decides what it sees. Steps before ``ranges`` run while quantizers collect statistics (a step
that reads activations in float disables them itself, e.g. ``fxquant.ptq.activations.float_rows``); a failure
there clears every range calibrate sets (convert then asks for a calibration). Steps after ``ranges`` see every
range calibrated (``state.stage == "calibrated"``), quantizers in "quant" mode, the model in its own train/eval
mode (set eval yourself where it matters), and gradients off (``torch.enable_grad()`` where a step learns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from fxquant.backends.base import Backend
from fxquant.calib.batches import ModelBatches
from fxquant.ptq.activations import Forward
from fxquant.quantizer import TensorQuantizer, quantizers_of
from fxquant.report import PTQReport
from fxquant.spec import QuantConfig
from fxquant.state import QuantState


@dataclass
class CalibrationContext:
    """What every calibrate step gets.

    ``model``: the prepared model, changed in place. ``batches``: the model inputs of each calibration batch
    (tuples of tensors, selected and checked), iterable again for each step that reads them (a re-iterable source
    such as a DataLoader is read again, streaming; a one-shot iterator is kept in a list when any step of this
    run reads the batches, ``reads_batches``). ``run(index, batch)``: one forward of ``model`` whose
    failure names the batch. ``state``: the model's ``QuantState`` (backend, config, prepare report; read it,
    the pipeline writes it). ``quantizers``: the quantizers this calibration sets (name -> quantizer; the ones
    the user disabled, AdaRound fixed or that are dynamic are left out). ``distributed``: statistics are merged
    across torch.distributed ranks. ``progress``: show progress bars. ``data``: the checked batch source (its
    all-zero check needs every batch seen). ``watches``: what a step before the ranges leaves for its step after
    them (by step name), to decide on the activations of the ranges pass instead of a pass of its own; ``hooks``:
    the hooks such a step sets for the ranges pass, closed by its later step or when the calibrating steps end.
    """

    model: nn.Module
    batches: Iterable[tuple]
    run: Forward
    state: QuantState
    quantizers: dict[str, TensorQuantizer]
    distributed: bool
    progress: bool
    data: ModelBatches
    watches: dict[str, object] = field(default_factory=dict)
    hooks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def float_pass(self) -> bool:
        """Whether the ranges pass runs the float model: every quantizer it does not calibrate is disabled (a
        dynamic quantizer, or a weight's whose codes AdaRound fixed, quantizes in that pass)."""
        calibrated = {id(q) for q in self.quantizers.values()}
        return all(id(q) in calibrated or q.mode == "disabled" for q in quantizers_of(self.model).values())

    @property
    def config(self) -> QuantConfig:
        return self.state.config

    @property
    def backend(self) -> Backend:
        return self.state.backend


@dataclass
class StepResult:
    """What a step did: ``report`` (recorded as ``report_of(model).ptq[step.name]``; None records nothing),
    ``notes`` (lines for the prepare report's ``skipped``), ``fixed_weights`` (names of weight quantizers whose
    integer codes the step fixed: later calibrations keep their ranges)."""

    report: PTQReport | None = None
    notes: list[str] = field(default_factory=list)
    fixed_weights: set[str] = field(default_factory=set)


Step = Callable[[CalibrationContext], StepResult]
Predicate = Callable[[CalibrationContext], bool]


def always(_ctx: CalibrationContext) -> bool:
    return True


def never(_ctx: CalibrationContext) -> bool:
    return False


@dataclass(frozen=True)
class CalibrateStep:
    """One calibrate-time pass, declared as data.

    ``name``: its key in ``report_of(model).ptq``. ``run``: the step function. ``applies(ctx)``: whether it runs
    in this calibration (checked just before it would run). ``reads_batches(ctx)``: whether it reads
    ``ctx.batches`` (so calibrate keeps them in a list), asked before the first step runs. ``distributed``: under
    distributed calibration, "run" (every rank runs it on its own batches), or for a step that decides from the
    data and changes the model (ranks would change their models differently) "skip" (a report note) or
    "skip_and_warn" (the note as a warning too); then ``option`` (default: ``name``) is the QuantConfig field
    that switches it, and True there raises instead of skipping.
    """

    name: str
    run: Step
    applies: Predicate = always
    reads_batches: Predicate = never
    distributed: Literal["run", "skip", "skip_and_warn"] = "run"
    option: str | None = None


def auto_applies(ctx: CalibrationContext, option: str, found: Callable[[nn.Module], bool]) -> bool:
    """For a step run once per prepared model and switched by ``QuantConfig.<option>`` ("auto" / True / False,
    its report named ``option``): asked for, not done yet, and True or (for "auto") ``found(ctx.model)``."""
    setting = getattr(ctx.config, option)
    return bool(setting) and option not in ctx.state.report.ptq and (setting is True or found(ctx.model))


def auto_result(ctx: CalibrationContext, option: str, report: PTQReport) -> StepResult:
    """The result of such a step: "auto" records the report only where the step changed something."""
    return StepResult(report if report.done or getattr(ctx.config, option) is True else None)
