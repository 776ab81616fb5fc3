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
from torch import fx, nn

from fxquant.passes.manager import PassResult
from fxquant.ptq.bn_stats import bn_stats, shift_stats
from fxquant.ptq.chains import find_chains, input_response
from fxquant.ptq.report import PTQReport


def _padding_free(module: nn.Module) -> bool:
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _why_not(link, modules: dict) -> str | None:
    a, b = link.a.target, link.b.target
    if not link.through_relu:
        return f"`{a}` -> `{b}`: no ReLU between them, so nothing is always on"
    if bn_stats(link.a) is None:
        return f"`{a}` -> `{b}`: `{a}` has no folded BatchNorm, so its output distribution is unknown"
    if not _padding_free(modules[b]):
        return f"`{a}` -> `{b}`: `{b}` pads with zeros, so absorbing would change its border outputs"
    for node in link.via:
        if node.op == "call_module" and not _padding_free(modules[node.target]):
            return f"`{a}` -> `{b}`: `{node.target}` pads, so absorbing would change its border outputs"
        if node.op != "call_module" and link.kinds[link.via.index(node)] in ("max_pool", "avg_pool"):
            return f"`{a}` -> `{b}`: functional pooling `{node.name}` (padding unknown)"
    return None


@torch.no_grad()
def absorb_high_bias(gm: fx.GraphModule, sigmas: float = 3.0) -> PassResult:
    """Absorb always-on bias through every eligible ReLU link of ``gm`` in place."""
    report = PTQReport("bias_absorption")
    modules = dict(gm.named_modules())
    chains, _ = find_chains(gm)
    absorbed: dict[str, float] = {}
    for link in (link for chain in chains for link in chain.links):
        reason = _why_not(link, modules)
        if reason is not None:
            report.skipped.append(reason)
            continue
        a, b = modules[link.a.target], modules[link.b.target]
        stats = bn_stats(link.a)
        amount = torch.clamp(stats.mean - sigmas * stats.std, min=0.0)
        if not bool((amount > 0).any()):
            report.skipped.append(f"`{link.a.target}` -> `{link.b.target}`: no channel has mean - "
                                  f"{sigmas:g} std > 0")
            continue
        if b.bias is None:
            b.bias = nn.Parameter(torch.zeros(b.weight.shape[0], dtype=b.weight.dtype, device=b.weight.device))
        b.bias.add_(input_response(b, amount, link.repeat).to(b.bias.dtype))
        a.bias.sub_(amount.to(a.bias.dtype))
        shift_stats(link.a, -amount)
        absorbed[link.a.target] = float(amount.abs().max())
        report.done.append(f"`{link.a.target}` -> `{link.b.target}`: moved bias of {int((amount > 0).sum())} "
                           f"channel(s) (up to {float(amount.max()):.3g}) into `{link.b.target}`")
    report.data = {"absorbed_max": absorbed}
    return PassResult(gm, bool(absorbed), product=report)
