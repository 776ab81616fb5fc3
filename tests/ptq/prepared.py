"""A prepared model calibrated on the given batches, warnings (float ops, slow int8) silenced: the PTQ tests' setup."""

from __future__ import annotations

import warnings

from torch import nn

import fxquant


def calibrated(model: nn.Module, batches: list, backend: str, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, batches[0][:1], backend=backend, config=fxquant.QuantConfig(**config))
        fxquant.calibrate(prepared, batches, progress=False)
    return prepared
