"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights of the Linears that read them.

A LayerNorm output X read by Linears W_1..W_n (BERT's q/k/v, or the FFN input) has a few channels with large
ranges that a per-tensor activation scale cannot follow. With per-channel factors
``s_c = max|X_c|^a / max_i max|W_i[:, c]|^(1-a)`` the LayerNorm's weight and bias are divided by s and every
W_i's input column c is multiplied by s_c: ``(X / s) (W s)^T = X W^T``, so the function is unchanged. Other
readers of X (the residual add of a post-LN block) get a constant ``X * s`` multiply, which restores X exactly.

How it gets data: SmoothQuant needs per-channel activation maxima, so it runs in ``calibrate()``, on the
calibration batches, before any range is calibrated (weight ranges are then taken from the smoothed weights).
The strength ``a`` is searched per LayerNorm over ``ALPHAS`` (and "no smoothing"): the choice that minimizes
the squared error of the Linears' outputs with fake-quantized inputs (per tensor, the input quantizer's bits and
symmetry, min/max range) and weights (per output channel, the weight quantizer's bits) on the calibration
activations. Groups whose LayerNorm output reaches a non-Linear reader through the Linears' input quantizer
are skipped, with the reason, in ``report_of(prepared).ptq["smoothquant"]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxquant.ptq.activations import Forward, Sharing, float_rows, sites_by_part
from fxquant.ptq.step import CalibrationContext, StepResult, auto_applies, auto_result
from fxquant.qmath import fake_quant_minmax
from fxquant.quantizer import TensorQuantizer
from fxquant.report import PTQReport

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class Group:
    """A LayerNorm module (``norm``: its path), its calls, the Linear modules that read them (directly or through
    their input quantizer; each once, however often called) and the other readers of each call ``(call, reader)``,
    which get the compensating multiply. Smoothing a module changes every call of it, so a group holds them all."""

    norm: str
    calls: list[fx.Node]
    linears: list[str]
    others: list[tuple[fx.Node, fx.Node]]
    quantizer: TensorQuantizer | None


def _readers(call: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], list[fx.Node], list, str | None]:
    """(Linear calls, other readers, input quantizers, why not smoothable) of one LayerNorm call."""
    linears, others, quantizers, why = [], [], [], None
    for user in call.users:
        target = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(target, TensorQuantizer):
            quantizers.append(target)
            readers = [modules.get(u.target) if u.op == "call_module" else None for u in user.users]
            if all(isinstance(r, nn.Linear) for r in readers):
                linears += list(user.users)
            else:
                why = "its quantized output is also read by non-Linear ops"
        elif isinstance(target, nn.Linear) and user.args[0] is call:
            linears.append(user)
        else:
            others.append(user)
    if linears and why is None and len(quantizers) > 1:
        why = "its output has several input quantizers"
    return linears, others, quantizers, why


def find_groups(gm: fx.GraphModule, sharing: Sharing) -> tuple[list[Group], list[str]]:
    """Every LayerNorm module (with affine weight) whose output feeds at least one Linear; notes for those skipped:
    a Linear it feeds is also called on another input, or a weight it would change is shared (tied) elsewhere."""
    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.weight.dim() == 1:
            calls.setdefault(node.target, []).append(node)
    groups, notes = [], []
    for path, nodes in calls.items():
        linear_calls, others, quantizers, why = [], [], [], None
        for call in nodes:
            lin, oth, qs, reason = _readers(call, modules)
            linear_calls += lin
            others += [(call, o) for o in oth]
            quantizers += qs
            why = why or reason
        if not linear_calls:
            continue
        linears = list(dict.fromkeys(n.target for n in linear_calls))
        norm, mods = modules[path], [modules[p] for p in linears]
        if why is None:
            why = _shared(sharing, norm, nodes, mods, linears, linear_calls)
        if why:
            notes.append(f"`{path}`: {why}")
        else:
            groups.append(Group(path, nodes, linears, others, quantizers[0] if quantizers else None))
    return groups, notes


def _shared(sharing: Sharing, norm: nn.LayerNorm, calls: list[fx.Node], mods: list[nn.Linear], paths: list[str],
            linear_calls: list[fx.Node]) -> str | None:
    """Why smoothing would change something outside the group (None when it would not)."""
    if sharing.called_elsewhere(norm, calls):
        return "the LayerNorm is also called in another traced part"
    for path, mod in zip(paths, mods, strict=True):
        if sharing.called_elsewhere(mod, linear_calls):
            return f"`{path}` is also called on an input this LayerNorm does not produce"
    params = [norm.weight, *([norm.bias] if norm.bias is not None else []), *(m.weight for m in mods)]
    other = sharing.outside(params, [norm, *mods])
    return f"a weight it would scale is shared with {other}" if other else None


def _factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def _search(x: torch.Tensor, linears: list[nn.Linear], act_bits: int, symmetric: bool
            ) -> tuple[float | None, torch.Tensor | None, dict[str, float]]:
    """(alpha or None for no smoothing, factors, error per candidate)."""
    linears = list({id(lin.weight): lin for lin in linears}.values())  # a weight two Linears share: once
    weights = [lin.weight.detach().float() for lin in linears]
    w_bits = [getattr(getattr(lin, "weight_quantizer", None), "spec", None) for lin in linears]
    w_bits = [8 if s is None else s.num_bits for s in w_bits]
    x_max = x.abs().amax(0)
    w_max = torch.cat(weights).abs().amax(0)
    ref = [x @ w.t() for w in weights]

    def error(s: torch.Tensor) -> float:
        xq = fake_quant_minmax(x / s, act_bits, symmetric, None)
        return float(sum(((xq @ fake_quant_minmax(w * s, b, True, 0).t() - r) ** 2).sum()
                         for w, b, r in zip(weights, w_bits, ref, strict=True)))

    errors = {"none": error(torch.ones_like(x_max))}
    best: tuple[float | None, torch.Tensor | None] = (None, None)
    for alpha in ALPHAS:
        s = _factors(x_max, w_max, alpha)
        errors[str(alpha)] = error(s)
        if errors[str(alpha)] < min(v for k, v in errors.items() if k != str(alpha)):
            best = (alpha, s)
    return best[0], best[1], errors


@torch.no_grad()
def _apply(gm: fx.GraphModule, g: Group, s: torch.Tensor) -> None:
    norm = gm.get_submodule(g.norm)
    norm.weight.div_(s.to(norm.weight.dtype))
    if norm.bias is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for weight in {id(w): w for w in (gm.get_submodule(p).weight for p in g.linears)}.values():
        weight.mul_(s.to(weight.dtype))  # once per weight, however many calls or Linears share it
    if g.others:
        name = f"{g.norm.replace('.', '_')}_smooth_restore"
        gm.register_buffer(name, s.clone())
        for call in dict.fromkeys(c for c, _ in g.others):
            with gm.graph.inserting_after(call):
                const = gm.graph.get_attr(name)
            with gm.graph.inserting_after(const):
                restored = gm.graph.call_function(operator.mul, (call, const))
            for c, user in g.others:
                if c is call:
                    user.replace_input_with(call, restored)


@torch.no_grad()
def smoothable(model: nn.Module) -> bool:
    """Whether a traced part of ``model`` has a LayerNorm -> Linear group SmoothQuant can smooth."""
    sharing = Sharing(model)
    return any(find_groups(gm, sharing)[0] for gm in model.modules() if isinstance(gm, fx.GraphModule))


def smoothquant(model: nn.Module, batches: list, run: Forward | None = None) -> PTQReport:
    """Smooth every eligible LayerNorm -> Linear group of ``model``'s traced parts in place (float-exact).
    ``run(index, batch)`` runs one batch (calibrate passes its checked runner; default ``model(*batch)``)."""
    report = PTQReport("smoothquant")
    groups, notes = sites_by_part(model, find_groups)
    report.skipped += notes
    if not groups:
        report.skipped.append("no LayerNorm feeds a Linear: nothing to smooth")
        return report
    taps = {id(g): (gm.get_submodule(g.norm), "output") for gm, gs in groups.items() for g in gs}
    rows = float_rows(model, taps, batches, run)
    layers = {}
    for gm, gs in groups.items():
        for g in gs:
            x = rows[id(g)]
            spec = g.quantizer.spec if g.quantizer is not None else None
            bits, symmetric = (8, True) if spec is None else (spec.num_bits, spec.symmetric)
            linears = [gm.get_submodule(p) for p in g.linears]
            alpha, s, errors = _search(x, linears, bits, symmetric)
            layers[g.norm] = {"alpha": alpha, "errors": errors}
            readers = ", ".join(g.linears)
            if s is None:
                report.skipped.append(f"`{g.norm}` -> {readers}: no alpha lowers the quantization error")
                continue
            _apply(gm, g, s)
            gain = errors["none"] / max(errors[str(alpha)], 1e-30)
            calls = f" ({len(g.calls)} calls, smoothed once)" if len(g.calls) > 1 else ""
            report.done.append(f"`{g.norm}` -> {readers}{calls}: alpha {alpha}, output error / {gain:.1f}")
        gm.recompile()
    report.data = {"layers": layers}
    return report


def smooths(ctx: CalibrationContext) -> bool:
    """Whether calibrate() runs SmoothQuant: asked for, not yet done, and (for "auto") a LayerNorm feeds a Linear."""
    return auto_applies(ctx, "smoothquant", smoothable)


def smoothquant_step(ctx: CalibrationContext) -> StepResult:
    """calibrate()'s SmoothQuant step, on its checked batches (``fxquant.ptq.step``)."""
    return auto_result(ctx, "smoothquant", smoothquant(ctx.model, ctx.batches, ctx.run))
