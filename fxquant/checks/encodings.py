"""Encodings against the model's own weights: a weight range must be the range of the weight it quantizes."""

from __future__ import annotations

import torch
from torch import nn

from fxquant import qmath
from fxquant.quantizer import TensorQuantizer


def _weight_of(model: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    if leaf != "weight_quantizer":
        return None
    weight = getattr(model.get_submodule(owner), "weight", None) if owner else getattr(model, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def weight_mismatches(model: nn.Module, quantizers: dict[str, TensorQuantizer],
                      ranges: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """One line per weight quantizer whose loaded range is not what calibrating the model's weight gives (more
    than one quantization step off): encodings saved from other weights or another kernel size."""
    found = []
    for name, q in quantizers.items():
        weight = _weight_of(model, name)
        if weight is None or q.spec.amax is not None or name not in ranges or not ranges[name]:
            continue
        probe = TensorQuantizer(q.spec, constant=True)
        probe.set_mode("calib")
        with torch.no_grad():
            probe(weight.detach().float().cpu())
        probe.load_calib_amax()
        lo, hi = ranges[name]["min"], ranges[name]["max"]
        if lo.shape != probe._min.shape:
            continue  # channel counts are checked with the spec
        step = qmath.qparams(lo, hi, q.spec.qmin, q.spec.qmax, q.spec.symmetric)[0]
        off = torch.maximum((lo - probe._min).abs(), (hi - probe._max).abs())
        if bool((off > step * 1.01 + 1e-12).any()):
            found.append(f"{name}: the file's weight range (amax {float(torch.maximum(lo.abs(), hi.abs()).max()):.4g})"
                         f" is not the range of the model's weight (amax {float(probe.amax.max()):.4g}, shape "
                         f"{list(weight.shape)}): the encodings come from a model with other weights or another "
                         "kernel size")
    return found
