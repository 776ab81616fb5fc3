"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For each link A -> B (see ``chains``), output channel c of A is divided by s_c and input channel c of B is
multiplied by s_c with s_c = sqrt(r_A(c) / r_B(c)), where r_A(c) is max |W_A| over output channel c and r_B(c)
max |W_B| over what reads channel c. Afterwards both ranges equal sqrt(r_A r_B): per-tensor weight ranges
stop being dominated by a few channels. A chain of more than two layers (conv -> depthwise -> conv ...) is
swept pair by pair until no scale moves by more than ``tol`` (relative), as the paper iterates.
The function is unchanged up to float rounding, except with ``relu6_as_relu``: ReLU6 / Hardtanh(0, m) inside a
link becomes ReLU (DFQ's recipe for MobileNetV2; ``fxquant.ptq.relu6``), and the change in float output on the
example inputs is reported as an SQNR in dB (infinite when no activation reached the clip).
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.ops.kinds import WeightedOp, weighted_ops
from fxquant.passes.manager import PassResult
from fxquant.ptq import relu6
from fxquant.ptq.bn_stats import scale_stats
from fxquant.ptq.chains import Chain, Link, find_chains, input_ranges, op_name, output_ranges, scale_input, scale_output
from fxquant.report import PTQReport

MAX_SWEEPS = 200


def _imbalance(ranges: torch.Tensor) -> float:
    """max over min of a layer's nonzero per-channel ranges (1 = perfectly balanced)."""
    nonzero = ranges[ranges > 0]
    return float(nonzero.max() / nonzero.min()) if nonzero.numel() else 1.0


@torch.no_grad()
def equalize_link(link: Link, ops: dict[fx.Node, WeightedOp]) -> float:
    """Equalize one link in place; returns the largest |log s_c| applied (0 when already balanced)."""
    a, b = ops[link.a], ops[link.b]
    r_a, r_b = output_ranges(a).double(), input_ranges(b, link.repeat).double()
    s = torch.where((r_a > 0) & (r_b > 0), torch.sqrt(r_a / r_b.clamp_min(1e-300)), torch.ones_like(r_a))
    scale_output(a, 1.0 / s)
    scale_input(b, s, link.repeat)
    scale_stats(link.a, 1.0 / s.float())
    return float(s.log().abs().max()) if s.numel() else 0.0


def equalize_chain(chain: Chain, ops: dict[fx.Node, WeightedOp], tol: float = 1e-4) -> tuple[int, bool]:
    """Sweep the chain's links until converged; returns (sweeps, converged)."""
    for sweep in range(1, MAX_SWEEPS + 1):
        moved = max(equalize_link(link, ops) for link in chain.links)
        if moved < tol:
            return sweep, True
    return MAX_SWEEPS, False


def equalize(gm: fx.GraphModule, tol: float = 1e-4, relu6_as_relu: bool | None = False,
             example_inputs: object = None) -> PassResult[PTQReport]:
    """Cross-layer equalize every chain of ``gm`` in place; the product is the PTQ report.

    ``relu6_as_relu``: True also equalizes through ReLU6 / Hardtanh(0, m), replacing them by ReLU; None does so
    only when that keeps the output SQNR on ``example_inputs`` at or above ``relu6.MIN_SQNR_DB`` (see
    ``fxquant.ptq.relu6``). The measured change is ``report.data['relu6_sqnr_db']``."""
    report = PTQReport("equalize")
    chains, notes = find_chains(gm, relu6_as_relu is not False)
    clipped = [n for chain in chains for link in chain.links for n in link.clipped]
    db = relu6.change_db(gm, clipped, example_inputs) if clipped else None
    if clipped and relu6_as_relu is None and (db is None or db < relu6.MIN_SQNR_DB):
        chains, notes = find_chains(gm, False)
        measured = "no example inputs to measure on" if db is None else f"the float output SQNR would be {db:.1f} dB"
        notes.append(f"not equalized through {len(clipped)} ReLU6/Hardtanh as ReLU: {measured} (at least "
                     f"{relu6.MIN_SQNR_DB:g} dB wanted; QuantConfig(equalize_relu6=True) forces it)")
        clipped = []
    report.skipped += notes
    ops, _ = weighted_ops(gm)
    per_layer: dict[str, dict[str, float]] = {}
    for chain in chains:
        before = {op_name(n): _imbalance(output_ranges(ops[n])) for n in chain.layers}
        sweeps, converged = equalize_chain(chain, ops, tol)
        after = {op_name(n): _imbalance(output_ranges(ops[n])) for n in chain.layers}
        for name in before:
            per_layer[name] = {"imbalance_before": before[name], "imbalance_after": after[name]}
        worst_before, worst_after = max(before.values()), max(after.values())
        status = f"converged in {sweeps} sweep(s)" if converged else f"not converged after {sweeps} sweeps"
        report.done.append(f"{chain.describe()}: {status}; worst output-channel range ratio "
                           f"{worst_before:.1f} -> {worst_after:.1f}")
        if not converged:
            report.skipped.append(f"{chain.describe()}: stopped after {sweeps} sweeps without converging "
                                  f"(tol {tol}); the result is still function-preserving")
    report.data = {"chains": [[op_name(n) for n in c.layers] for c in chains], "layers": per_layer}
    if db is not None:
        report.data["relu6_sqnr_db"] = db
    if clipped:
        report.data["relu6_replaced"] = [n.name for n in clipped]
        relu6.unclip(gm, clipped)
        line = f"{len(clipped)} ReLU6/Hardtanh replaced by ReLU to equalize through them (equalize_relu6)"
        report.done.append(line + ("" if db is None else f"; float output vs before on the example inputs: "
                                                         f"SQNR {db:.1f} dB"))
    return PassResult(gm, bool(chains), product=report)  # skips are in the PTQ report (report_of(prepared).ptq)
