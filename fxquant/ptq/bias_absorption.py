"""High-bias absorption (Nagel et al. 2019, section 4.2), exact form.

After equalization some channels of A carry large biases, which widen the activation range after ReLU.
Where A's BatchNorm statistics say its output channel c is ~N(beta_c, gamma_c), the part
a_c = max(0, beta_c - 3 gamma_c) is always on (ReLU(x - a) = ReLU(x) - a whenever x >= a, true for ~99.9% of
values): it is subtracted from A's bias and added back through B as B(a), i.e. B's bias grows by the response
of B to the constant a. Exactness needs B to see no zero padding (padding would add -a at borders) and only
ReLU, identity, padding-free pooling and flatten between A and B; other links are skipped with the reason.
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.ops.kinds import WeightedOp, weighted_ops
from fxquant.passes.manager import PassResult
from fxquant.ptq.bn_stats import bn_stats, shift_stats
from fxquant.ptq.chains import find_chains, input_response, op_name
from fxquant.report import PTQReport


def _padding_free(padding: object) -> bool:
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _why_not(link, modules: dict, ops: dict[fx.Node, WeightedOp]) -> str | None:
    a, b = op_name(link.a), op_name(link.b)
    if not link.through_relu:
        return f"`{a}` -> `{b}`: no ReLU between them, so nothing is always on"
    if bn_stats(link.a) is None:
        return f"`{a}` -> `{b}`: `{a}` has no folded BatchNorm, so its output distribution is unknown"
    if not _padding_free(ops[link.b].padding) or ops[link.b].pads_inside:
        return f"`{a}` -> `{b}`: `{b}` pads with zeros, so absorbing would change its border outputs"
    for node in link.via:
        if node.op == "call_module" and not _padding_free(getattr(modules[node.target], "padding", 0)):
            return f"`{a}` -> `{b}`: `{node.target}` pads, so absorbing would change its border outputs"
        if node.op != "call_module" and link.kinds[link.via.index(node)] in ("max_pool", "avg_pool"):
            return f"`{a}` -> `{b}`: functional pooling `{node.name}` (padding unknown)"
    return None


@torch.no_grad()
def absorb_high_bias(gm: fx.GraphModule, sigmas: float = 3.0) -> PassResult:
    """Absorb always-on bias through every eligible ReLU link of ``gm`` in place."""
    report = PTQReport("bias_absorption")
    modules = dict(gm.named_modules())
    ops, _ = weighted_ops(gm)
    chains, _ = find_chains(gm)
    absorbed: dict[str, float] = {}
    for link in (link for chain in chains for link in chain.links):
        reason = _why_not(link, modules, ops)
        if reason is not None:
            report.skipped.append(reason)
            continue
        a, b = ops[link.a], ops[link.b]
        stats = bn_stats(link.a)
        amount = torch.clamp(stats.mean - sigmas * stats.std, min=0.0)
        if not bool((amount > 0).any()):
            report.skipped.append(f"`{a.name}` -> `{b.name}`: no channel has mean - {sigmas:g} std > 0")
            continue
        response = input_response(b, amount, link.repeat)
        b.write(bias=(b.bias if b.bias is not None else torch.zeros_like(response)) + response.to(b.weight.dtype))
        a.write(bias=a.bias - amount.to(device=a.bias.device, dtype=a.bias.dtype))
        shift_stats(link.a, -amount)
        absorbed[a.name] = float(amount.abs().max())
        report.done.append(f"`{a.name}` -> `{b.name}`: moved bias of {int((amount > 0).sum())} "
                           f"channel(s) (up to {float(amount.max()):.3g}) into `{b.name}`")
    report.data = {"absorbed_max": absorbed}
    return PassResult(gm, bool(absorbed), product=report)
