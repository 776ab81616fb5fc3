"""calibrate()'s ranges step: the calibrator loop (padded positions left out: ``fxquant.calib.positions``), the
merge across ranks, and each quantizer's range."""

from __future__ import annotations

import contextlib
import dataclasses

from tqdm.auto import tqdm

from fxquant.calib import distributed as dist_calib
from fxquant.calib.positions import PositionReport, counting_positions
from fxquant.calib.reuse import reusing_buffers
from fxquant.errors import CalibrationError, NegativeInputError
from fxquant.ptq.layers import disabled
from fxquant.ptq.step import CalibrationContext, StepResult
from fxquant.quantizer import TensorQuantizer
from fxquant.report import PTQReport


def collect_ranges(ctx: CalibrationContext) -> StepResult:
    """Run every batch through the model with its quantizers collecting statistics (weights and other constants
    once: they are the same every batch), merge every rank's statistics under distributed calibration, then turn
    each quantizer's statistics into its range. Its report (``report_of(model).ptq["ranges"]``, where the model
    has a padding-mask input) says which positions set the ranges. Raises CalibrationError for no batches,
    all-zero data, or a quantizer that saw no data."""
    if ctx.distributed:
        dist_calib.await_ranks()  # every rank must be here: detect a calibrate on one rank only
    constants = [q for q in ctx.quantizers.values() if q.constant]  # weights, layer scales: the same every batch
    count = 0
    # padded positions (the model's attention_mask input) do not set ranges; the report says what was masked
    with counting_positions(ctx.model, ctx.quantizers) as positions, contextlib.ExitStack() as reuse:
        # element-wise ops reuse the buffers nothing else reads (``fxquant.calib.reuse``): from the first batch
        # where that forward is built already or more batches are known to follow, else from the second (one code
        # generation, which one small batch would not repay)
        reuse.enter_context(reusing_buffers(ctx.model, build=_known_length(ctx.batches) > 1))
        for i, batch in enumerate(tqdm(ctx.batches, desc="fxquant calibrate", unit="batch", disable=not ctx.progress)):
            if count == 1:
                reuse.enter_context(reusing_buffers(ctx.model))  # a second batch: built now, if not yet
            ctx.run(i, batch)
            if count == 0:  # constants are the same in every batch: their statistics are complete after one
                for q in constants:
                    q.set_mode("disabled")
            count += 1
    if ctx.distributed:  # merge every rank's statistics: all ranks get the same ranges
        count = dist_calib.sync_calibrators(ctx.quantizers, count, device=dist_calib.module_device(ctx.model))
    if count == 0:
        raise CalibrationError("the calibration iterable was empty; pass at least one batch")
    ctx.data.check_all_zero()
    negative = []
    for name, q in ctx.quantizers.items():
        if q.spec.amax is None and q.calibrator.num_batches == 0:
            raise CalibrationError(f"quantizer `{name}` saw no data during calibration: the branch it sits "
                                   "on never ran for these batches")
        try:
            q.load_calib_amax()
        except NegativeInputError as exc:
            negative.append((name, exc))
        except ValueError as exc:
            raise CalibrationError(f"quantizer `{name}`: {exc}") from exc
    if negative:  # unsigned specs on signed data: each named, not clipped to 0 in silence
        raise NegativeInputError(f"{len(negative)} unsigned quantizer(s) saw negative calibration data ("
                                 + ", ".join(f"`{n}`" for n, _ in negative[:6]) + "): " + str(negative[0][1]))
    return StepResult(_positions_report(positions))


def _known_length(batches: object) -> int:
    """How many batches ``batches`` holds, where that is known before reading them (0 for a stream)."""
    try:
        return len(batches)
    except TypeError:  # a plain iterator: no length (the checked batches raise TypeError as len() would)
        return 0


def recollect_ranges(ctx: CalibrationContext, quantizers: list[TensorQuantizer]) -> None:
    """Collect the statistics of ``quantizers`` (some of ``ctx.quantizers``, whose inputs a step changed) again
    over the batches and set their ranges; every other quantizer passes its input through meanwhile and keeps its
    range."""
    ids = {id(q) for q in quantizers}
    chosen = {name: q for name, q in ctx.quantizers.items() if id(q) in ids}
    with disabled([q for q in ctx.quantizers.values() if id(q) not in ids]):
        for q in chosen.values():
            q.calibrator.reset()
            q.set_mode("calib")
        collect_ranges(dataclasses.replace(ctx, quantizers=chosen))


def _positions_report(positions: PositionReport) -> PTQReport | None:
    """Which positions set the ranges; None for a model without a padding-mask input."""
    if positions.mask is None:
        return None
    report = PTQReport("ranges", data={"mask": positions.mask, "padded": positions.padded, "masked": positions.masked})
    if positions.masked and positions.padded:
        report.done.append(f"ranges from the positions `{positions.mask}` keeps: {len(positions.masked)} quantizer(s) "
                           f"skipped the padded positions ({positions.padded:.0%} of the calibration positions)")
    elif positions.why_not:
        report.skipped.append(positions.why_not)
    return report
