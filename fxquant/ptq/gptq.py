"""GPTQ weight rounding (Frantar et al. 2023, after Optimal Brain Quantization): each weight row is rounded one
input column at a time, and the rounding error of a column is pushed onto the columns not yet rounded, weighted by
the layer's input second moments ``H = E[x x^T]``. This minimizes the layer's output error ``E[(dW x)^2]`` instead
of each weight's own error, at the same step and codes range as round-to-nearest: what the quantizer exports is
unchanged but for the codes.

Where it pays: a depthwise 3x3 conv whose taps nearly cancel on smooth images (EfficientNet-Lite0's first
block alone costs 20 dB of output SQNR with nearest rounding, 33 dB with GPTQ), and every layer whose inputs are
correlated. No labels, no training: ``H`` is summed from the layer inputs of calibrate's ranges pass, on a strided
subset of positions (``MAX_POSITIONS`` per forward), so it costs no forward of its own.

The contract of the two steps: ``gptq_watch_step`` (before the ranges) taps each eligible layer's input;
``gptq_step`` (after the weight widths) rounds each layer's weight onto its quantizer's grid, in place, and fixes
those codes (``StepResult.fixed_weights``). Rows whose new codes could overflow ORT's int16 u8s8 sums (the
saturation-aware widths, ``fxquant.ptq.weight_widths``) keep round-to-nearest.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx

from fxquant import qmath
from fxquant.ptq.layers import Layer, conv_args, hook_inputs, input_taps, pair
from fxquant.ptq.step import CalibrationContext, StepResult
from fxquant.ptq.weight_widths import PAIR_LIMIT, reduction_rows, saturating_pairs, saturation_aware
from fxquant.quantizer import TensorQuantizer
from fxquant.report import PTQReport

MAX_POSITIONS = 4096  # input positions per forward summed into H at most (a strided grid over the batch)
DEPTHWISE_POSITIONS = 512  # a depthwise conv's per-channel (k, k) matrices need few
MAX_COLUMNS = 1152  # the widest reduction rounded (128 channels x 3 x 3; 1x1 convs of 1152 channels): the cost
# grows with its cube, and wider layers (resnet50's last stages) would cost more than the calibration forwards
BLOCK = 128  # columns rounded between two matrix updates of the rest (the paper's lazy batch updates)
DAMP = 0.01  # added to H's diagonal, as a fraction of its mean (the paper's default)


def applies(ctx: CalibrationContext) -> bool:
    """Whether calibrate() runs GPTQ: ``QuantConfig(gptq=True)`` asks for it, and the ranges pass runs the float
    model (where it taps the layer inputs; a re-calibration, with the codes fixed, does not)."""
    return ctx.config.gptq and ctx.float_pass and isinstance(ctx.model, fx.GraphModule)


class _Watch:
    """The eligible layers, where their inputs are read, and the sums of ``x x^T`` per layer."""

    def __init__(self, gm: fx.GraphModule) -> None:
        uses = Counter(id(t) for _, t in gm.named_parameters(remove_duplicate=False))

        def unsupported(layer: Layer) -> str | None:
            return _unsupported(layer) or ("its weight is shared with another module (tied): rounding it would "
                                           "change the other" if uses[id(layer.weight)] > 1 else None)

        self.taps, skipped = input_taps(gm, unsupported, lambda why: f"round-to-nearest ({why})")
        self.report = PTQReport("gptq", skipped=skipped)
        self.layers = [layer for _, _, layer in self.taps]
        self.sums: dict[str, torch.Tensor] = {}

    def hook(self, layer: Layer, x: torch.Tensor) -> None:
        h = _second_moments(layer, x.detach().float())
        if layer.name in self.sums:
            self.sums[layer.name] += h
        else:
            self.sums[layer.name] = h


def _unsupported(layer: Layer) -> str | None:
    q, w = layer.quantizer, layer.weight
    if layer.kind not in ("conv", "linear") or (layer.kind == "conv" and w.dim() != 4):
        return f"a {layer.kind} of {w.dim()}-D weight (GPTQ covers Linear and Conv2d)"
    if q.spec.axis not in (None, 0) or not q.spec.symmetric:
        return "its weight quantizer is not symmetric per tensor or per output channel"
    if layer.groups not in (1, w.shape[0]) or (layer.groups > 1 and w.shape[1] != 1):
        return "a grouped conv that is not depthwise"
    if getattr(layer.module, "padding_mode", "zeros") != "zeros":
        return f"a conv that pads with {layer.module.padding_mode!r}, which its input moments do not model"
    if layer.groups == 1 and w[0].numel() > MAX_COLUMNS:
        return f"{w[0].numel()} weights per output channel, over GPTQ's {MAX_COLUMNS} (its cost grows with the cube)"
    return None


def _rows_wanted(columns: int, depthwise: bool) -> int:
    """Input positions per forward summed into H: twice the columns (H's size; over several batches that is
    plenty), at least 256, at most ``MAX_POSITIONS``; a depthwise conv's (k, k) matrices need few."""
    return DEPTHWISE_POSITIONS if depthwise else min(MAX_POSITIONS, max(256, 2 * columns))


def _second_moments(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """``sum x x^T`` over a strided subset of the layer's input positions (float64): (in, in) for a Linear or
    conv, (channels, k, k) for a depthwise conv (each channel has its own inputs)."""
    w = layer.weight
    depthwise = layer.groups > 1
    wanted = _rows_wanted(w[0].numel(), depthwise)
    if layer.kind == "linear":
        rows = x.reshape(-1, x.shape[-1])
        rows = rows[:: max(1, rows.shape[0] // wanted)]
        return (rows.T @ rows).double()
    stride, padding, dilation = conv_args(layer)
    if isinstance(padding, str):  # "same"/"valid": torch pads inside the conv; read it as the layer does
        if padding == "same":
            pads = [d * (k - 1) for d, k in zip(pair(dilation), w.shape[-2:], strict=True)]
            x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        padding = 0
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
           zip(x.shape[-2:], padding, dilation, w.shape[-2:], stride, strict=True)]
    every = max(1, math.isqrt(max(1, out[0] * out[1] // wanted)))  # a strided grid of positions per image...
    per_image = -(-out[0] // every) * -(-out[1] // every)
    x = x[: max(1, -(-wanted // per_image))]  # ...over as many images as it takes to have ``wanted`` positions
    step = (stride[0] * every, stride[1] * every)
    if w.shape[-2:] == (1, 1) and padding == (0, 0):  # a 1x1 conv reads each position alone: no unfold
        rows = x[:, :, :: step[0], :: step[1]].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return (rows.T @ rows).double()
    cols = _patches(x, w.shape[-2:], step, padding, dilation)  # (N, C, k, positions)
    if depthwise:  # one (k, k) matrix per channel: a batched matmul over the channels
        cols = cols.permute(1, 2, 0, 3).reshape(w.shape[0], cols.shape[2], -1)
        return torch.bmm(cols, cols.transpose(1, 2)).double()
    rows = cols.permute(0, 3, 1, 2).reshape(-1, cols.shape[1] * cols.shape[2])  # (positions, C*k): weight order
    return (rows.T @ rows).double()


def _patches(x: torch.Tensor, kernel: tuple[int, int], step: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int]) -> torch.Tensor:
    """The conv's input patches at every ``step``-th output position, (N, C, kh * kw, positions), from one
    strided slice per kernel tap (cheaper than unfold's im2col over the whole input)."""
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n_h = -(-(x.shape[-2] - dilation[0] * (kernel[0] - 1)) // step[0])
    n_w = -(-(x.shape[-1] - dilation[1] * (kernel[1] - 1)) // step[1])
    taps = [x[:, :, i * dilation[0]::step[0], j * dilation[1]::step[1]][:, :, :n_h, :n_w]
            for i in range(kernel[0]) for j in range(kernel[1])]
    return torch.stack(taps, 2).flatten(3)


def gptq_watch_step(ctx: CalibrationContext) -> StepResult:
    """Before the ranges: tap the eligible layers' inputs for the ranges pass."""
    watch = _Watch(ctx.model)
    for handle in hook_inputs(watch.taps, watch.hook):
        ctx.hooks.callback(handle.remove)
    ctx.watches["gptq"] = watch
    return StepResult()


def watching(ctx: CalibrationContext) -> bool:
    return "gptq" in ctx.watches


def gptq_step(ctx: CalibrationContext) -> StepResult:
    """After the weight widths: round every tapped layer's weight with GPTQ, in place; its codes are fixed."""
    watch: _Watch = ctx.watches.pop("gptq")
    report = watch.report
    guard = saturation_aware(ctx) and ctx.config.target != "vnni"
    fixed = set()
    for layer in watch.layers:
        h = watch.sums.get(layer.name)
        q = layer.quantizer
        if h is None:
            report.skipped.append(f"`{layer.name}`: round-to-nearest (no calibration batch reached it)")
            continue
        with torch.no_grad():
            nearest = _nearest(layer.weight, q)
            rounded = gptq_round(layer.weight, h, q, layer.groups > 1)
            kept = _overflowing_rows(layer, rounded, q) if guard else None
            if kept is not None and kept.any():
                rounded[kept] = nearest[kept]
            layer.weight.copy_(rounded.to(layer.weight.dtype))
        fixed.add(layer.quantizer_path or f"{layer.name}.weight_quantizer")  # as AdaRound names them
        note = f" ({int(kept.sum())} rows keep round-to-nearest: ORT's int16 u8s8 sums)" if kept is not None \
            and kept.any() else ""
        report.done.append(f"`{layer.name}`: GPTQ rounding{note}")
        report.data[layer.name] = {"changed_codes": int((rounded != nearest).sum()), "of": rounded.numel()}
    return StepResult(report, fixed_weights=fixed)


def _step(q: TensorQuantizer, rows: int) -> torch.Tensor:
    step = q.scale.detach().double().reshape(-1)
    return step.expand(rows) if step.numel() == 1 else step


def _on_grid(values: torch.Tensor, step: torch.Tensor, q: TensorQuantizer) -> torch.Tensor:
    """``values`` rounded to the nearest code of ``q``'s range at ``step`` (symmetric), dequantized."""
    return qmath.quantize(values, step, 0.0, q.spec.qmin, q.spec.qmax) * step


def _nearest(weight: torch.Tensor, q: TensorQuantizer) -> torch.Tensor:
    w = weight.detach().double().reshape(weight.shape[0], -1)
    return _on_grid(w, _step(q, w.shape[0])[:, None], q).reshape(weight.shape).float()


def gptq_round(weight: torch.Tensor, h: torch.Tensor, q: TensorQuantizer, per_row: bool) -> torch.Tensor:
    """``weight`` rounded onto ``q``'s grid, column by column, each column's error compensated on the next ones
    through ``h`` (one matrix for every row, or with ``per_row`` one per row: depthwise). Returns the dequantized
    weight (float32, same shape)."""
    w = weight.detach().double().reshape(weight.shape[0], -1).clone()
    step = _step(q, w.shape[0])
    h = h.clone() if per_row else h.unsqueeze(0).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0  # an input that is always zero: its weight cannot matter, round it alone
    diag[dead] = 1.0
    diag += DAMP * diag.mean(-1, keepdim=True)
    factor, info = torch.linalg.cholesky_ex(h)
    if bool(info.any()):  # not positive definite even damped: nearest rounding
        return _nearest(weight, q)
    u = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)  # (1 or rows, cols, cols)
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], BLOCK):
        end = min(start + BLOCK, w.shape[1])
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            column = w[:, i]
            rounded = _on_grid(column, step, q)
            out[:, i] = rounded
            errors[:, i - start] = error = (column - rounded) / u[:, i, i]
            w[:, i + 1:end] -= error[:, None] * u[:, i, i + 1:end]
        if end < w.shape[1]:  # the block's errors onto every later column at once
            w[:, end:] -= (errors.unsqueeze(1) @ u[:, start:end, end:]).squeeze(1) if per_row else \
                errors @ u[0, start:end, end:]
    return out.reshape(weight.shape).float()


def _overflowing_rows(layer: Layer, rounded: torch.Tensor, q: TensorQuantizer) -> torch.Tensor | None:
    """Rows whose GPTQ codes could overflow ORT's int16 u8s8 pair sums (None where ORT cannot saturate)."""
    rows = reduction_rows(rounded, layer.kind, layer.groups)
    if rows is None:
        return None
    codes = qmath.quantize(rows, _step(q, rows.shape[0])[:, None].float(), 0.0, q.spec.qmin, q.spec.qmax)
    return saturating_pairs(codes, PAIR_LIMIT) > 0
