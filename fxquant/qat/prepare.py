"""prepare_qat: a prepared model whose quantizers train (STE), learn (LSQ), track (EMA) or keep their ranges."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxquant.api import checked_arguments
from fxquant.backends import Backend
from fxquant.errors import ConfigError, FxQuantError
from fxquant.pipeline import prepare_model
from fxquant.qat.quantizer import RANGE_MODES, QATQuantizer
from fxquant.quantizer import quantizers_of
from fxquant.spec import QuantConfig
from fxquant.state import get_state


class QATError(FxQuantError, ValueError):
    """A model or an optimizer that quantization-aware training cannot use, with what to do instead."""


@dataclass(frozen=True)
class QATOptions:
    """How the ranges behave during training (validated arguments of ``prepare_qat``)."""

    ranges: str = "fixed"
    ema_decay: float = 0.99
    freeze_ranges_after: int | None = None

    def __post_init__(self) -> None:
        if self.ranges not in RANGE_MODES:
            raise ConfigError(f"ranges={self.ranges!r} is unknown; valid: {RANGE_MODES} (learned ranges come from "
                              "QuantSpec(learn_amax=True))")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                or not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be a number in (0, 1), e.g. 0.99; got {self.ema_decay!r}")
        steps = self.freeze_ranges_after
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ConfigError(f"freeze_ranges_after must be None or an int >= 0 (training steps), got {steps!r}")


def _count_steps(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a QAT model: one training step per forward in training mode."""
    if module.training:
        for q in module.modules():
            if isinstance(q, QATQuantizer):
                q.count_step()


def prepare_qat(model: nn.Module, example_inputs: torch.Tensor | tuple, backend: str | Backend = "tensorrt",
                config: QuantConfig | None = None, *, ranges: str = "fixed", ema_decay: float = 0.99,
                freeze_ranges_after: int | None = None) -> nn.Module:
    """``fxquant.prepare`` for quantization-aware training; calibrate it, then train it like any nn.Module.

    BatchNorm is folded into the preceding Conv/Linear with its running statistics (see README, "BatchNorm
    during QAT"), and the folded weights train. Every quantizer fake-quantizes with a straight-through
    gradient. Ranges: ``QuantSpec(learn_amax=True)`` in ``config`` makes them LSQ parameters; otherwise
    ``ranges="fixed"`` keeps the calibrated ranges and ``ranges="ema"`` tracks them during training (decay
    ``ema_decay``). ``freeze_ranges_after=N`` stops all range changes after N training forwards.

    Build the optimizer from the returned model's parameters after ``fxquant.calibrate`` (learned ranges are
    created by calibration); ``fxquant.check_optimizer(model, optimizer)`` verifies it. The result of
    ``fxquant.convert`` is the same kind of frozen fake-quant GraphModule as after PTQ.
    """
    state = get_state(model)
    if state is not None:
        raise QATError(f"prepare_qat() takes the float model, but this one is already {state.stage} by fxquant"
                       + (" (its ranges are frozen constants and its Q/DQ ops have no gradient)"
                          if state.stage == "converted" else "") +
                       "; call fxquant.prepare_qat(float_model, example_inputs, ...) on the original nn.Module")
    options = QATOptions(ranges, ema_decay, freeze_ranges_after)
    backend, config = checked_arguments(model, backend, config, qat=True)
    gm = prepare_model(model, example_inputs, backend, config)
    for name, q in quantizers_of(gm).items():
        twin = QATQuantizer(q.spec, q.constant, options.ranges, options.ema_decay, options.freeze_ranges_after)
        twin.set_mode(q.mode)
        gm.set_submodule(name, twin.train(q.training))
    gm.register_forward_pre_hook(_count_steps)
    return gm
