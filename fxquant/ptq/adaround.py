"""``fxquant.adaround``: learn the rounding of every quantized weight of a calibrated model.

AdaRound's rounding variables (``fxquant.ptq.rounding``), fitted block by block with activation quantization in
the loop (``fxquant.ptq.reconstruct``; ``AdaRoundOptions.granularity="layer"`` fits one layer at a time, as the
AdaRound paper does). calibrate() leaves the rounded weights' ranges alone afterwards (``QuantState.fixed_weights``).
"""

from __future__ import annotations

import time
from collections import Counter

from torch import fx, nn

from fxquant.errors import CalibrationError, ConfigError, ConfigTypeError
from fxquant.ptq.layers import Layer, quantized_layers
from fxquant.ptq.reconstruct import reconstruct, take_samples
from fxquant.ptq.report import PTQReport, attach
from fxquant.spec import AdaRoundOptions
from fxquant.state import get_state


def adaround(prepared: nn.Module, batches, options: AdaRoundOptions | None = None,
             progress: bool = True) -> PTQReport:
    """Learn the rounding of every quantized weight of a calibrated ``prepared`` model, in place.

    ``batches``: calibration batches (model inputs), read once up to ``options.num_samples`` samples. Returns the
    report (also in ``fxquant.report_of(prepared).ptq['adaround']``): per block its output MSE with nearest and
    with learned rounding and its time; ``report.data['codes']`` holds each layer's integer codes.
    """
    options = AdaRoundOptions() if options is None else options
    if not isinstance(options, AdaRoundOptions):
        raise ConfigTypeError(f"options must be an AdaRoundOptions, got {type(options).__name__}")
    state = get_state(prepared)
    if state is None or state.stage != "calibrated":
        raise CalibrationError("adaround() needs a model that fxquant.calibrate() has run on (weights and "
                               "activations need ranges first)")
    if batches is None or not hasattr(batches, "__iter__") or hasattr(batches, "shape"):
        raise ConfigTypeError("batches must be an iterable of batches, not a single tensor; wrap it: [tensor]")
    start = time.perf_counter()
    report = PTQReport("adaround")
    if not isinstance(prepared, fx.GraphModule):
        report.skipped.append("the model is not one traced graph (parts of it run eagerly), and reconstruction runs "
                              "on a traced graph: its weights keep round-to-nearest")
        attach(prepared, report)
        return report
    layers, notes = quantized_layers(prepared)
    report.skipped += notes
    layers = _learnable(prepared, layers, report)
    samples, notes = take_samples(batches, options.num_samples)
    report.skipped += notes
    if not samples:
        raise ConfigError("adaround() needs at least one calibration batch")
    was_training = prepared.training
    prepared.eval()
    try:
        codes = reconstruct(prepared, layers, samples, options, report, progress)
    finally:
        prepared.train(was_training)
    state.fixed_weights.update(layer.quantizer_path or f"{layer.name}.weight_quantizer" for layer in layers
                               if layer.name in codes)
    report.data.update({"codes": codes, "options": options, "samples": int(samples[0].shape[0]),
                        "seconds": time.perf_counter() - start})
    attach(prepared, report)
    return report


def _learnable(gm: fx.GraphModule, layers: list[Layer], report: PTQReport) -> list[Layer]:
    """The layers whose rounding can be learned: symmetric weights, one call site."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    kept = []
    for layer in layers:
        if not layer.quantizer.spec.symmetric:
            report.skipped.append(f"`{layer.name}`: affine weight quantization (zero point) is not supported")
        elif layer.module is not None and calls[layer.name] > 1:
            report.skipped.append(f"`{layer.name}`: called at {calls[layer.name]} places; its weights keep "
                                  "round-to-nearest")
        else:
            kept.append(layer)
    return kept
