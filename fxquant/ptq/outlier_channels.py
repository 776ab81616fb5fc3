"""Outlier input channels in float beside the int8 Linear (LLM.int8()'s decomposition, Dettmers et al. 2022).

A few input channels of some Linears carry values far above the rest: the "massive activations" trained
transformers put on one or two channels of the FFN down-projection input (MiniLM's GELU outputs reach 25 on
one channel at the [CLS] token, where the median channel's maximum is about 1). One per-tensor scale must then
cover them, and every other channel is quantized with a step 5-25x too coarse. SmoothQuant cannot move them
through the GELU into the up-projection, and scaling them into the weights moves the problem there.

The split: for the outlier channels ``O`` of a Linear's input ``x`` (found on the calibration batches)

    y = Linear_int8(x * mask) + x[..., O] @ W[:, O]^T

``mask`` zeroes ``O`` before the input quantizer (static or dynamic, so its range no longer holds them), the
Linear's weight columns ``O`` are zeroed (so its per-row weight ranges no longer hold them either) and a float
matmul of ``|O|`` channels adds their exact contribution (its weight a parameter, so QAT trains it). The
function is unchanged in float (tested); the float side path costs one Mul, one Gather, one ``T x |O| x N``
MatMul and one Add per Linear.

Which channels: those whose calibration maximum ``|x|`` exceeds ``RATIO`` times the median channel's, at most
``MAX_CHANNELS`` per Linear. The number kept is searched on the calibration activations (0, 1, 2, ... of those,
largest first): the one with the least output error of the fake-quantized Linears (the input quantizer's bits
and symmetry, per-tensor min/max; the weight quantizer's bits, per output channel), taken only when it divides
the error of no split by at least ``MIN_GAIN``. Runs in ``calibrate()`` after SmoothQuant, before ranges are
calibrated; Linears whose input quantizer is per-channel or also read by other ops are left, with the reason.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.ptq.activations import Forward, Sharing, float_rows, sites_by_part, stacked_rows, tapped_rows
from fxquant.ptq.step import CalibrationContext, StepResult, auto_applies, auto_result
from fxquant.qmath import fake_quant_minmax
from fxquant.quantizer import TensorQuantizer
from fxquant.report import PTQReport

RATIO = 8.0  # an outlier channel's calibration max |x| is above RATIO x the median channel's
MAX_CHANNELS = 8  # at most this many float channels per Linear (the side matmul stays tiny)
MIN_GAIN = 2.0  # the split must divide the Linears' output error on the calibration data by at least this


@dataclass
class Site:
    """An activation input quantizer node, the node it reads, the Linear nodes that read it, and whether their
    weights are the site's own (``own``: every user of each weight is one of these calls, so its outlier columns
    can be zeroed; a tied LM head or a Linear also called elsewhere keeps them, the masked input makes them inert)."""

    quantizer: fx.Node
    source: fx.Node
    linears: list[fx.Node]
    own: bool = True


def find_sites(gm: fx.GraphModule, sharing: Sharing) -> tuple[list[Site], list[str]]:
    """Every per-tensor activation quantizer that feeds only Linears (as their input); notes for those left."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    sites, notes = [], []
    for node in gm.graph.nodes:
        q = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(q, TensorQuantizer) or q.constant or not isinstance(node.args[0], fx.Node):
            continue
        readers = list(node.users)
        linears = [u for u in readers if u.op == "call_module" and isinstance(modules.get(u.target), nn.Linear)
                   and u.args[0] is node]
        if not linears:
            continue
        if calls[node.target] > 1:
            notes.append(f"`{node.target}`: one quantizer used at {calls[node.target]} places; its channels stay")
        elif len(linears) != len(readers):
            notes.append(f"`{node.target}`: also read by ops other than Linear inputs; its channels stay")
        elif q.spec.axis is not None:
            notes.append(f"`{node.target}`: per-channel already; nothing to split")
        else:
            mods = list({id(m): m for m in (modules[n.target] for n in linears)}.values())
            own = not any(sharing.called_elsewhere(m, linears) for m in mods) and \
                sharing.outside([m.weight for m in mods], mods) is None
            sites.append(Site(node, node.args[0], linears, own))
    return sites, notes


def candidates(channel_max: torch.Tensor) -> list[int]:
    """The channels whose max |x| is above RATIO x the median channel's, largest first (at most MAX_CHANNELS)."""
    order = channel_max.argsort(descending=True)[:MAX_CHANNELS]
    limit = RATIO * channel_max.median()
    return [int(c) for c in order if channel_max[c] > limit]


def _search(x: torch.Tensor, weights: list[torch.Tensor], act: TensorQuantizer, w_bits: list[int],
            channels: list[int], zero_weights: bool = True) -> tuple[int, dict[int, float]]:
    """(how many of ``channels`` to split, output error per count); ``zero_weights``: the split zeroes the
    weights' outlier columns (else they stay in the int8 weights' ranges)."""
    ref = [x @ w.t() for w in weights]
    bits, symmetric = act.spec.num_bits, act.spec.symmetric

    def error(k: int) -> float:
        keep = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        keep[channels[:k]] = 0
        xq = fake_quant_minmax(x * keep, bits, symmetric, None)
        side = x[:, channels[:k]]
        zeroed = keep if zero_weights else torch.ones_like(keep)
        return float(sum(((xq @ fake_quant_minmax(w * zeroed, b, True, 0).t() + side @ w[:, channels[:k]].t() - r)
                          ** 2).sum() for w, b, r in zip(weights, w_bits, ref, strict=True)))

    errors = {k: error(k) for k in range(len(channels) + 1)}
    best = min(errors, key=errors.get)
    return (best if errors[0] >= MIN_GAIN * errors[best] else 0), errors


@torch.no_grad()
def _apply(gm: fx.GraphModule, site: Site, channels: list[int]) -> None:
    graph, src = gm.graph, site.source
    base = site.quantizer.target.replace(".", "_")
    first = gm.get_submodule(site.linears[0].target)
    keep = torch.ones(first.in_features, dtype=first.weight.dtype, device=first.weight.device)
    keep[channels] = 0
    gm.register_buffer(f"{base}_outlier_keep", keep)
    gm.register_buffer(f"{base}_outlier_index", torch.tensor(channels, dtype=torch.long, device=keep.device))
    with graph.inserting_before(site.quantizer):
        mask = graph.get_attr(f"{base}_outlier_keep")
        masked = graph.call_function(operator.mul, (src, mask))
        index = graph.get_attr(f"{base}_outlier_index")
        picked = graph.call_function(torch.index_select, (src, -1, index))
    site.quantizer.replace_input_with(src, masked)
    weights: dict[str, str] = {}  # module -> its outlier weight: one per Linear, however often it is called
    for node in site.linears:
        linear = gm.get_submodule(node.target)
        if node.target not in weights:
            weights[node.target] = _free_name(gm, f"{node.target.replace('.', '_')}_outlier_weight")
            # a parameter, so that QAT after calibrate() trains the outlier channels' weights too
            gm.register_parameter(weights[node.target], nn.Parameter(
                linear.weight[:, channels].detach().clone(), requires_grad=linear.weight.requires_grad))
            if site.own:  # a weight shared elsewhere keeps its columns: the masked input makes them inert here
                linear.weight[:, channels] = 0
        users = list(node.users)
        with graph.inserting_after(node):
            weight = graph.get_attr(weights[node.target])
        with graph.inserting_after(weight):
            side = graph.call_function(F.linear, (picked, weight))
        with graph.inserting_after(side):
            total = graph.call_function(operator.add, (node, side))
        for user in users:
            user.replace_input_with(node, total)


def _free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ... : one not yet an attribute of ``gm`` (a Linear split at two sites)."""
    k, free = 0, name
    while hasattr(gm, free):
        k += 1
        free = f"{name}_{k}"
    return free


def splittable(model: nn.Module) -> bool:
    """Whether a traced part of ``model`` has a per-tensor activation quantizer that only Linears read."""
    sharing = Sharing(model)
    return any(find_sites(gm, sharing)[0] for gm in model.modules() if isinstance(gm, fx.GraphModule))


def split_outlier_channels(model: nn.Module, batches: list, run: Forward | None = None) -> PTQReport:
    """Split the outlier input channels of every eligible Linear of ``model``'s traced parts (float-exact).
    ``run(index, batch)`` runs one batch (calibrate passes its checked runner; default ``model(*batch)``)."""
    watch = OutlierWatch(model)
    return watch.split(float_rows(model, watch.taps, batches, run))[0]


class OutlierWatch:
    """The split's sites in ``model`` and the taps on their input quantizers (key ``id(site)``), decided on the
    float rows those taps keep: by ``split_outlier_channels``' own float pass, or by calibrate's ranges pass when
    that pass runs the float model (``watching``)."""

    def __init__(self, model: nn.Module) -> None:
        self.sites, self.notes = sites_by_part(model, find_sites)
        self.taps = {id(s): (gm.get_submodule(s.quantizer.target), "input") for gm, ss in self.sites.items()
                     for s in ss}

    def split(self, rows: dict[int, torch.Tensor]) -> tuple[PTQReport, list[TensorQuantizer]]:
        """Split every site where it pays on ``rows`` (``taps``' float rows); the report, and the quantizers
        whose inputs changed (the split sites' input quantizers and the zeroed Linears' weight quantizers)."""
        report = PTQReport("outlier_channels", skipped=list(self.notes))
        changed: list[TensorQuantizer] = []
        if not self.sites:
            return report, changed
        layers: dict[str, dict] = {}
        for gm, ss in self.sites.items():
            for site in ss:
                changed += _split_site(gm, site, rows[id(site)], report, layers)
            gm.graph.lint()
            gm.recompile()
        report.data = {"layers": layers}
        return report, changed


def _split_site(gm: fx.GraphModule, site: Site, x: torch.Tensor, report: PTQReport,
                layers: dict[str, dict]) -> list[TensorQuantizer]:
    """Search and apply the split of one site on its float input rows ``x``, noting what was done or why not in
    ``report`` and ``layers``; the quantizers whose inputs it changed (none when it split nothing)."""
    channel_max = x.abs().amax(0)
    readers = ", ".join(dict.fromkeys(n.target for n in site.linears))
    channels = candidates(channel_max)
    if not channels:  # measured first: the search (and its float matmuls) runs only where an outlier can matter
        report.skipped.append(f"`{readers}`: no input channel's max |x| is above {RATIO:g}x the median channel's "
                              f"(largest {float(channel_max.max()):.3g}, median {float(channel_max.median()):.3g})")
        return []
    act = gm.get_submodule(site.quantizer.target)
    linears = list({n.target: gm.get_submodule(n.target) for n in site.linears}.values())  # each once
    w_quantizers = [getattr(lin, "weight_quantizer", None) for lin in linears]
    w_bits = [8 if q is None else q.spec.num_bits for q in w_quantizers]
    k, errors = _search(x, [lin.weight.detach().float() for lin in linears], act, w_bits, channels, site.own)
    layers[readers] = {"channels": channels[:k], "errors": {str(n): e for n, e in errors.items()}}
    if k == 0:
        report.skipped.append(f"`{readers}`: input channels {channels} reach {channel_max[channels[0]]:.3g} "
                              f"(median channel {channel_max.median():.3g}), but running them in float "
                              f"divides the output error by less than {MIN_GAIN}")
        return []
    _apply(gm, site, channels[:k])
    report.done.append(f"`{readers}`: input channel(s) {channels[:k]} (max |x| "
                       f"{', '.join(f'{float(channel_max[c]):.3g}' for c in channels[:k])}; median channel "
                       f"{float(channel_max.median()):.3g}) run in float beside the int8 Linear, output "
                       f"error / {errors[0] / max(errors[k], 1e-30):.1f}"
                       + ("" if site.own else "; the weight is shared elsewhere, so its columns stay"))
    return [act] + ([q for q in w_quantizers if q is not None] if site.own else [])


def splits(ctx: CalibrationContext) -> bool:
    """Whether calibrate() looks for outlier input channels of Linears: asked for, not yet done, and (for "auto") a
    per-tensor activation quantizer feeds a Linear."""
    return auto_applies(ctx, "outlier_channels", splittable)


def outlier_channels_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s outlier-channel split, on its checked batches (``fxquant.ptq.step``). Where the ranges pass
    runs the float model it only taps the sites' inputs for that pass (``split_watched`` decides after it, so a
    model where nothing is split, e.g. a CNN head, runs no extra pass); otherwise it runs a float pass now."""
    if not ctx.float_pass:
        return auto_result(ctx, "outlier_channels", split_outlier_channels(ctx.model, ctx.batches, ctx.run))
    watch = OutlierWatch(ctx.model)
    ctx.watches["outlier_channels"] = (watch, ctx.hooks.enter_context(tapped_rows(watch.taps)))
    return StepResult()


def watching(ctx: CalibrationContext) -> bool:
    """Whether ``outlier_channels_step`` tapped the ranges pass (``split_watched`` then runs)."""
    return "outlier_channels" in ctx.watches


def split_watched(ctx: CalibrationContext) -> tuple[StepResult, list[TensorQuantizer]]:
    """The split decided on the rows the ranges pass kept: its result, and the quantizers whose inputs it changed
    (their statistics must be collected again)."""
    watch, rows = ctx.watches.pop("outlier_channels")
    ctx.hooks.close()
    report, changed = watch.split(stacked_rows(rows, watch.taps))
    return auto_result(ctx, "outlier_channels", report), changed
