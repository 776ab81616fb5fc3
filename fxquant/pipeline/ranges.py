"""calibrate()'s ranges step: the calibrator loop, the merge across ranks, and each quantizer's range."""

from __future__ import annotations

from tqdm.auto import tqdm

from fxquant.calib import distributed as dist_calib
from fxquant.errors import CalibrationError, NegativeInputError
from fxquant.ptq.step import CalibrationContext, StepResult


def collect_ranges(ctx: CalibrationContext) -> StepResult:
    """Run every batch through the model with its quantizers collecting statistics (weights and other constants
    once: they are the same every batch), merge every rank's statistics under distributed calibration, then turn
    each quantizer's statistics into its range. Raises CalibrationError for no batches, all-zero data, or a
    quantizer that saw no data."""
    if ctx.distributed:
        dist_calib.await_ranks()  # every rank must be here: detect a calibrate on one rank only
    constants = [q for q in ctx.quantizers.values() if q.constant]  # weights, layer scales: the same every batch
    count = 0
    for i, batch in enumerate(tqdm(ctx.batches, desc="fxquant calibrate", unit="batch", disable=not ctx.progress)):
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
    return StepResult()
