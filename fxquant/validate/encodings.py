"""Encodings against the model's own weights: a weight range must be the range of the weight it quantizes."""

from __future__ import annotations

import torch
from torch import nn

from fxquant import qmath
from fxquant.backends.base import Backend
from fxquant.ops.kinds import module_kind
from fxquant.ptq.weight_widths import FULL_BITS, PAIR_LIMIT, SAFE_BITS, eligible, reduction_rows, widen
from fxquant.quantizer import TensorQuantizer
from fxquant.spec import QuantConfig


def _weight_of(model: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    if leaf != "weight_quantizer":
        return None
    weight = getattr(model.get_submodule(owner), "weight", None) if owner else getattr(model, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def chosen_widths(backend: Backend, config: QuantConfig, quantizers: dict[str, TensorQuantizer],
                  entries: dict) -> dict[str, int]:
    """Weight quantizers whose bit width the backend chooses per layer (saturation-aware weights): the width an
    encodings file records for them (7 or 8) is part of the saved calibration, like the range."""
    if not backend.saturation_aware_weights or config.weight is not None:
        return {}
    widths = {}
    for name, q in quantizers.items():
        bits = entries.get(name, {}).get("num_bits") if isinstance(entries.get(name), dict) else None
        if q.constant and bits in (SAFE_BITS, FULL_BITS) and eligible(q.spec, backend.weight):
            widths[name] = bits
    return widths


def _expected(q: TensorQuantizer, weight: torch.Tensor, owner: nn.Module, bits: int | None,
              target: str | None) -> list[TensorQuantizer]:
    """Probe quantizers calibrated on ``weight`` as calibration would leave them: the plain range, and where the
    backend chooses the width for a CPU that can saturate, the saturation-aware range (with and without
    AdaRound's headroom)."""
    probe = TensorQuantizer(q.spec, constant=True)
    probe.set_mode("calib")
    with torch.no_grad():
        probe(weight.detach().float().cpu())
    probe.load_calib_amax()
    if bits is None or target == "vnni":
        return [probe]
    kind, groups = module_kind(owner), getattr(owner, "groups", 1)
    if reduction_rows(weight, kind, groups) is None:
        return [probe]
    probes = []
    for limit in (PAIR_LIMIT, PAIR_LIMIT - 2):
        widened = TensorQuantizer(q.spec, constant=True)
        widened._min, widened._max = probe._min.clone(), probe._max.clone()
        widen(widened, weight.detach().float().cpu(), kind, groups, limit)
        probes.append(widened)
    return probes


def weight_mismatches(model: nn.Module, quantizers: dict[str, TensorQuantizer],
                      ranges: dict[str, dict[str, torch.Tensor]], widths: dict[str, int],
                      config: QuantConfig) -> list[str]:
    """One line per weight quantizer whose loaded range is not what calibrating the model's weight gives (more
    than one quantization step off): encodings saved from other weights or another kernel size."""
    found = []
    for name, q in quantizers.items():
        weight = _weight_of(model, name)
        if weight is None or q.spec.amax is not None or name not in ranges or not ranges[name] \
                or type(q) is not TensorQuantizer:  # QAT ranges train (learned, EMA): no calibration to compare
            continue
        lo, hi = ranges[name]["min"], ranges[name]["max"]
        spec = q.spec.with_(num_bits=widths[name]) if name in widths else q.spec
        step = qmath.qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)[0]
        probes = _expected(q, weight, model.get_submodule(name.rpartition(".")[0]), widths.get(name), config.target)
        if any(lo.shape == p._min.shape and not bool((torch.maximum((lo - p._min).abs(), (hi - p._max).abs())
                                                      > step * 1.01 + 1e-12).any()) for p in probes):
            continue
        if lo.shape != probes[0]._min.shape:
            continue  # channel counts are checked with the spec
        found.append(f"{name}: the file's weight range (amax {float(torch.maximum(lo.abs(), hi.abs()).max()):.4g})"
                     f" is not the range of the model's weight (amax {float(probes[0].amax.max()):.4g}, shape "
                     f"{list(weight.shape)}): the encodings come from a model with other weights or another "
                     "kernel size")
    return found
