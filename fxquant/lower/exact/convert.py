"""convert(exact=...): arguments checked, the exact model made and given its state."""

from __future__ import annotations

import dataclasses
import warnings

import onnxruntime as ort
import torch
from torch import nn

from fxquant.backends.base import Backend
from fxquant.capture.trace import normalize_inputs
from fxquant.errors import ConversionError
from fxquant.lower.exact.model import ExactInfo, check_ort_version, exact_model
from fxquant.spec import check_cpu_target
from fxquant.state import attach_state, get_state


def check_exact(exact: object, backend: Backend) -> str:
    """``exact`` if it is a CPU target and the backend deploys to ONNX Runtime's CPU kernels."""
    target = check_cpu_target(exact, "target exact=")
    if backend.verify_level != "all":
        raise ConversionError(f"convert(exact={exact!r}) reproduces ONNX Runtime's CPU kernels, which the "
                              f"{backend.name} backend does not deploy to: use exact=None (fake quant), or an ONNX "
                              "Runtime backend (onnxruntime, onnxruntime_dynamic)")
    return target


def convert_exact(fake: nn.Module, target: str, example_inputs: torch.Tensor | tuple) -> nn.Module:
    """The exact model of the converted ``fake`` for ``target`` (``fxquant.lower.exact.model``)."""
    inputs = normalize_inputs(example_inputs)
    if not inputs:
        raise ConversionError("convert(exact=...) exports the model to let ONNX Runtime build its graph and needs "
                              "example inputs: pass example_inputs=")
    message = check_ort_version()
    if message:
        warnings.warn(message, stacklevel=3)
    model = exact_model(fake, inputs, target)
    state = get_state(fake)
    attach_state(model, dataclasses.replace(state, exact=ExactInfo(target, fake, ort.__version__)))
    return model
