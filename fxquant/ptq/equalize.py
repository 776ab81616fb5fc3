"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For each link A -> B (see ``chains``), output channel c of A is divided by s_c and input channel c of B is
multiplied by s_c with s_c = sqrt(r_A(c) / r_B(c)), where r_A(c) is max |W_A| over output channel c and r_B(c)
max |W_B| over what reads channel c. Afterwards both ranges equal sqrt(r_A r_B): per-tensor weight ranges
stop being dominated by a few channels. A chain of more than two layers (conv -> depthwise -> conv ...) is
swept pair by pair until no scale moves by more than ``tol`` (relative), as the paper iterates.
The function is unchanged up to float rounding.
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.passes.manager import PassResult
from fxquant.ptq.bn_stats import scale_stats
from fxquant.ptq.chains import Chain, Link, find_chains, input_ranges, output_ranges, scale_input, scale_output
from fxquant.ptq.report import PTQReport

MAX_SWEEPS = 200


def _imbalance(ranges: torch.Tensor) -> float:
    """max over min of a layer's nonzero per-channel ranges (1 = perfectly balanced)."""
    nonzero = ranges[ranges > 0]
    return float(nonzero.max() / nonzero.min()) if nonzero.numel() else 1.0


@torch.no_grad()
def equalize_link(link: Link, modules: dict) -> float:
    """Equalize one link in place; returns the largest |log s_c| applied (0 when already balanced)."""
    a, b = modules[link.a.target], modules[link.b.target]
    r_a, r_b = output_ranges(a).double(), input_ranges(b, link.repeat).double()
    s = torch.where((r_a > 0) & (r_b > 0), torch.sqrt(r_a / r_b.clamp_min(1e-300)), torch.ones_like(r_a))
    scale_output(a, 1.0 / s)
    scale_input(b, s, link.repeat)
    scale_stats(link.a, 1.0 / s.float())
    return float(s.log().abs().max()) if s.numel() else 0.0


def equalize_chain(chain: Chain, modules: dict, tol: float = 1e-4) -> tuple[int, bool]:
    """Sweep the chain's links until converged; returns (sweeps, converged)."""
    for sweep in range(1, MAX_SWEEPS + 1):
        moved = max(equalize_link(link, modules) for link in chain.links)
        if moved < tol:
            return sweep, True
    return MAX_SWEEPS, False


def equalize(gm: fx.GraphModule, tol: float = 1e-4) -> PassResult[PTQReport]:
    """Cross-layer equalize every chain of ``gm`` in place; the product is the PTQ report."""
    report = PTQReport("equalize")
    chains, notes = find_chains(gm)
    report.skipped += notes
    modules = dict(gm.named_modules())
    per_layer: dict[str, dict[str, float]] = {}
    for chain in chains:
        before = {n.target: _imbalance(output_ranges(modules[n.target])) for n in chain.layers}
        sweeps, converged = equalize_chain(chain, modules, tol)
        after = {n.target: _imbalance(output_ranges(modules[n.target])) for n in chain.layers}
        for name in before:
            per_layer[name] = {"imbalance_before": before[name], "imbalance_after": after[name]}
        worst_before, worst_after = max(before.values()), max(after.values())
        status = f"converged in {sweeps} sweep(s)" if converged else f"not converged after {sweeps} sweeps"
        report.done.append(f"{chain.describe()}: {status}; worst output-channel range ratio "
                           f"{worst_before:.1f} -> {worst_after:.1f}")
        if not converged:
            report.skipped.append(f"{chain.describe()}: stopped after {sweeps} sweeps without converging "
                                  f"(tol {tol}); the result is still function-preserving")
    report.data = {"chains": [[n.target for n in c.layers] for c in chains], "layers": per_layer}
    return PassResult(gm, bool(chains), product=report)  # skips are in the PTQ report (report_of(prepared).ptq)
