"""Weight widths for ONNX Runtime's u8s8 kernels, chosen for the declared CPU target (``QuantConfig.target``).

With ``target="vnni"`` (AVX-VNNI, AVX-512 VNNI, AMX: every product accumulates exactly in int32) every layer gets
plain 8-bit weights. With ``target="avx2"`` or no declared target (safe on both), the widths are saturation-aware:

Without VNNI, ORT (MLAS, AVX2) multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds
two adjacent products into a saturating int16: elements ``2j`` and ``2j + 1`` of the reduction dimension.
The reduction order (checked on ORT 1.32 by tests/ptq/test_weight_widths.py): Linear/Gemm/MatMul along
``in_features``; Conv per group along ``(kh, kw, in_channels)`` with the input channel fastest (ORT reorders
OIHW filters to HWIO before packing, so with an odd channel count a pair spans two kernel positions).
Depthwise convs (one input and one output channel per group) run on a kernel that widens to 32 bits and
never saturates. With activations up to 255, a pair overflows when its same-signed codes add up to 129 or
more in magnitude (255 * 129 > 32767), which 7-bit weights (|code| <= 63) never reach.

For those targets ``choose_weight_bits`` gives each weight quantizer on the backend's default weight spec 8-bit
codes: the full range for output channels none of whose pairs can overflow, and for the others the smallest wider
range that keeps every pair below the limit (always a finer step than 7 bits, which the layer falls back to if
widening fails). The choice, per layer, goes to the prepare report (``report_of(model).ptq["weight_bits"]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.backends.base import Backend
from fxquant.ops.kinds import module_kind, quantized_weight_op
from fxquant.ptq.step import CalibrationContext, StepResult
from fxquant.qmath import symmetric_step
from fxquant.quantizer import TensorQuantizer
from fxquant.report import PTQReport
from fxquant.spec import QuantSpec

PAIR_LIMIT = 128  # largest same-signed pair sum whose product with 255 fits int16 (255 * 128 = 32640)
SAFE_BITS, FULL_BITS = 7, 8
KINDS = ("conv", "linear")  # the layers whose u8s8 reduction order is known (reduction_rows)


def reduction_rows(weight: torch.Tensor, kind: str, groups: int = 1) -> torch.Tensor | None:
    """The weight as (output channel, reduction) rows in the order ORT's u8s8 GEMM reads them; None when
    ORT runs the layer on a kernel that cannot saturate (depthwise) or whose order is not known (transposed)."""
    if kind == "linear":
        return weight.reshape(weight.shape[0], -1)
    if kind != "conv":
        return None
    out_channels, in_per_group = weight.shape[:2]
    if in_per_group == 1 and out_channels == groups:
        return None
    return weight.movedim(1, -1).reshape(out_channels, -1)  # (O, k..., I/g): the input channel fastest


def pair_magnitudes(rows: torch.Tensor) -> torch.Tensor:
    """Per adjacent pair (2j, 2j + 1) of each row, the magnitude of its same-signed parts: ``|a + b|`` when
    ``a`` and ``b`` share a sign, else ``max(|a|, |b|)``; so ``max(|a + b|, |a|, |b|)`` always (exact: no
    sum is rounded that the same-signed sums would not round). What one ``vpmaddubsw`` lane adds at worst,
    per unit of activation; shape (rows, pairs)."""
    if rows.shape[1] % 2:
        rows = F.pad(rows, (0, 1))
    a, b = rows.reshape(rows.shape[0], -1, 2).unbind(-1)
    size = rows.abs().reshape(rows.shape[0], -1, 2)  # abs of the contiguous rows: strided abs is slower
    most = torch.maximum(size[..., 0], size[..., 1])
    return torch.maximum(most, (a + b).abs_(), out=most)


def pair_sums(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the largest ``pair_magnitudes``."""
    return pair_magnitudes(rows).amax(-1)


def saturating_pairs(codes: torch.Tensor, limit: int = PAIR_LIMIT) -> torch.Tensor:
    """Per row of integer ``codes`` (floats or integers), how many adjacent pairs could overflow int16 in
    ``vpmaddubsw`` with uint8 activations (same-signed parts adding up to more than ``limit`` in magnitude)."""
    codes = codes if codes.is_floating_point() else codes.to(torch.int32)  # int8 codes would wrap when added
    lo, hi = torch.aminmax(codes)
    if max(-float(lo), float(hi)) > limit:  # a single code past the limit counts too
        return torch.count_nonzero(pair_magnitudes(codes) > limit, -1)
    # no code is past the limit (8-bit codes, limit 128): a pair is past it exactly when |a + b| is
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    a, b = codes.reshape(codes.shape[0], -1, 2).unbind(-1)
    return torch.count_nonzero((a + b).abs_() > limit, -1)


def row_codes(rows: torch.Tensor, amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The integer codes (as floats) of the reduction ``rows`` of a weight at the symmetric range ``amax``
    (one value, or one per row: the quantizer's axis 0), as ``qmath.quantize`` gives them (round half to even)."""
    step = symmetric_step(amax, spec.qmax)
    return torch.div(rows, step if step.dim() == 0 else step[:, None]).round_().clamp_(spec.qmin, spec.qmax)


def weighted_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer, torch.Tensor, str, int]]:
    """(layer name, weight quantizer, weight, kind, groups) for every quantized weight of a weighted layer:
    modules carrying ``weight_quantizer`` and functional convs/linears whose weight goes through a quantizer."""
    found = []
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if isinstance(q, TensorQuantizer) and isinstance(getattr(module, "weight", None), torch.Tensor):
            found.append((name, q, module.weight, module_kind(module), getattr(module, "groups", 1)))
        if isinstance(module, fx.GraphModule):
            found += _functional(module, name)
    return found


def _functional(gm: fx.GraphModule, prefix: str) -> list[tuple[str, TensorQuantizer, torch.Tensor, str, int]]:
    """Functional convs/linears (``fxquant.ops.kinds.quantized_weight_op``) whose weight goes through a quantizer."""
    found = []
    for node in gm.graph.nodes:
        op = quantized_weight_op(gm, node)
        if op is None or op.kind not in KINDS:
            continue
        q = gm.get_submodule((node.args[1] if len(node.args) > 1 else node.kwargs["weight"]).target)
        if isinstance(q, TensorQuantizer):
            found.append((f"{prefix}.{node.name}" if prefix else node.name, q, op.weight, op.kind, op.groups))
    return found


def eligible(spec: QuantSpec, default: QuantSpec) -> bool:
    return spec.num_bits in (SAFE_BITS, FULL_BITS) and spec.with_(num_bits=default.num_bits) == default


def widen(q: TensorQuantizer, weight: torch.Tensor, kind: str, groups: int, limit: int) -> dict:
    """8 bits for ``q``: channels whose 8-bit codes could overflow get their range widened to the smallest one
    that keeps every pair within ``limit`` (a step between the 8- and 7-bit ones); 7 bits if that fails.
    ``q`` quantizes per tensor or along the output channel (axis 0), as the backends' weight specs do."""
    q.spec = q.spec.with_(num_bits=FULL_BITS)
    rows = reduction_rows(weight.detach().float(), kind, groups)
    amax = q.amax.float()
    risky = saturating_pairs(row_codes(rows, amax, q.spec), limit)
    data = {"bits": FULL_BITS, "saturating_pairs_at_8_bits": int(risky.sum()), "channels": len(risky),
            "widened_channels": int((risky > 0).sum()), "min_effective_bits": float(FULL_BITS)}
    if not risky.any():
        return data
    # codes of a pair add up to at most qmax * pair / amax + 1 (rounding): this amax keeps them <= limit
    risky = risky > 0
    rows, widened = rows[risky], amax.expand(len(risky)).clone()
    pairs = pair_sums(rows)
    widened[risky] = torch.maximum(widened[risky], pairs * q.spec.qmax / (limit - 1))
    # each code is within 0.5 of weight / step, so a pair's codes add up to at most pair / step + 1: no row with
    # pair / step < limit (2^-20 of room for float rounding) can overflow; any other row's codes are checked
    unsure = pairs * (1 + 2.0 ** -20) / symmetric_step(widened[risky], q.spec.qmax) >= limit
    if unsure.any() and saturating_pairs(row_codes(rows[unsure], widened[risky][unsure], q.spec), limit).any():
        q.spec = q.spec.with_(num_bits=SAFE_BITS)
        return data | {"bits": SAFE_BITS, "widened_channels": 0, "min_effective_bits": float(SAFE_BITS)}
    q._min, q._max = -widened.to(q._min), widened.to(q._max)  # symmetric, one value per output channel
    levels = 2 * q.spec.qmax * amax / widened + 1
    return data | {"min_effective_bits": round(float(torch.log2(levels).min()), 2)}


def choose_weight_bits(model: nn.Module, backend: Backend, target: str | None = None, fixed: set[str] = frozenset(),
                       margin: int = 0) -> PTQReport:
    """Give every calibrated weight quantizer on ``backend``'s default weight spec 8-bit codes for the CPU
    ``target``: plain 8-bit ranges for ``"vnni"``; for ``"avx2"`` and no target, codes that no adjacent pair can
    overflow ORT's int16 u8s8 accumulation with: the full 8-bit range per output channel where no pair can
    overflow, a range widened just enough where one could (7 bits if that fails); returns the choice per layer.

    ``fixed``: quantizer names whose codes are fixed (AdaRound), left alone. ``margin``: codes a later pass may
    still move a pair by (AdaRound moves each weight by at most one), kept free below the overflow limit.
    """
    report = PTQReport("weight_bits")
    names = {id(m): n for n, m in model.named_modules()}
    for layer, q, weight, kind, groups in weighted_quantizers(model):
        if not eligible(q.spec, backend.weight) or not q.is_calibrated or names.get(id(q)) in fixed:
            continue
        if target == "vnni":
            q.spec = q.spec.with_(num_bits=FULL_BITS)
            report.done.append(f"`{layer}`: 8-bit weights (target 'vnni': int8 products accumulate exactly in int32)")
            report.data[layer] = {"bits": FULL_BITS, "target": "vnni"}
            continue
        if reduction_rows(weight, kind, groups) is None:
            q.spec = q.spec.with_(num_bits=FULL_BITS)
            report.done.append(f"`{layer}`: 8-bit weights (a {kind} ORT runs with 32-bit accumulation: depthwise)")
            report.data[layer] = {"bits": FULL_BITS, "saturating_pairs_at_8_bits": 0, "widened_channels": 0}
            continue
        data = widen(q, weight, kind, groups, PAIR_LIMIT - margin)
        widened = (f"; {data['widened_channels']} of {data['channels']} channels with a widened range (at least "
                   f"{data['min_effective_bits']} effective bits)" if data["widened_channels"] else "")
        report.done.append(f"`{layer}`: {data['bits']}-bit weights ({data['saturating_pairs_at_8_bits']} adjacent "
                           f"pairs could overflow ORT's int16 u8s8 accumulation with the plain 8-bit range"
                           f"{widened})")
        report.data[layer] = data
    return report


def saturation_aware(ctx: CalibrationContext) -> bool:
    """Whether calibrate() chooses saturation-safe weight widths: the backend asks for them
    (``Backend.saturation_aware_weights``) and the config names no weight spec of its own."""
    return ctx.backend.saturation_aware_weights and ctx.config.weight is None


def weight_bits_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s weight-width step (``fxquant.ptq.step``), after the ranges and before AdaRound."""
    margin = 2 if ctx.config.adaround_options else 0  # AdaRound may move each code by one: two codes of headroom
    return StepResult(choose_weight_bits(ctx.model, ctx.backend, ctx.config.target, ctx.state.fixed_weights,
                                         margin))
