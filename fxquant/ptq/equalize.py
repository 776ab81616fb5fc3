"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For each link A -> B (see ``chains``), output channel c of A is divided by s_c and input channel c of B is
multiplied by s_c with s_c = sqrt(r_A(c) / r_B(c)), where r_A(c) is max |W_A| over output channel c and r_B(c)
max |W_B| over what reads channel c. Afterwards both ranges equal sqrt(r_A r_B): per-tensor weight ranges
stop being dominated by a few channels. A chain of more than two layers (conv -> depthwise -> conv ...) is
swept pair by pair until no scale moves by more than ``tol`` (relative), as the paper iterates.
The function is unchanged up to float rounding, except with ``relu6_as_relu``: ReLU6 / Hardtanh(0, m) inside a
link becomes ReLU (DFQ's recipe for MobileNetV2), and the change in float output on the example inputs is
reported as an SQNR in dB (infinite when no activation reached the clip).
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.backends.base import Backend
from fxquant.capture import normalize_inputs
from fxquant.metrics import sqnr
from fxquant.ops import WeightedOp, weighted_ops
from fxquant.passes.manager import PassResult
from fxquant.ptq.bn_stats import scale_stats
from fxquant.ptq.chains import Chain, Link, find_chains, input_ranges, op_name, output_ranges, scale_input, scale_output
from fxquant.ptq.report import PTQReport
from fxquant.spec import QuantConfig

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


def equalize(gm: fx.GraphModule, tol: float = 1e-4, relu6_as_relu: bool = False,
             example_inputs: object = None) -> PassResult[PTQReport]:
    """Cross-layer equalize every chain of ``gm`` in place; the product is the PTQ report.

    ``relu6_as_relu`` also equalizes through ReLU6 / Hardtanh(0, m), replacing them by ReLU; with
    ``example_inputs`` the change in float output is measured (``report.data['relu6_sqnr_db']``)."""
    report = PTQReport("equalize")
    chains, notes = find_chains(gm, relu6_as_relu)
    report.skipped += notes
    ops, _ = weighted_ops(gm)
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else None
    with torch.no_grad():
        reference = gm(*inputs) if inputs is not None and relu6_as_relu else None
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
    clipped = [n for chain in chains for link in chain.links for n in link.clipped]
    report.data = {"chains": [[op_name(n) for n in c.layers] for c in chains], "layers": per_layer}
    if clipped:
        _unclip(gm, clipped)
        report.data["relu6_replaced"] = [n.name for n in clipped]
        line = f"{len(clipped)} ReLU6/Hardtanh replaced by ReLU to equalize through them (equalize_relu6)"
        if reference is not None:
            with torch.no_grad():
                db = _output_sqnr(reference, gm(*inputs))
            report.data["relu6_sqnr_db"] = db
            line += f"; float output vs before on the example inputs: SQNR {db:.1f} dB"
        report.done.append(line)
    return PassResult(gm, bool(chains), product=report)  # skips are in the PTQ report (report_of(prepared).ptq)


def through_relu6(config: QuantConfig, backend: Backend) -> bool:
    """Whether equalization treats ReLU6 as ReLU: ``config.equalize_relu6``, or by default when weights are
    quantized per tensor (per-channel weights gain little from equalization, so the float change is not worth it:
    on the trained ReLU6 MobileNet-digits, per-tensor 4/6/8-bit weights gain 3.5/2.2/3.1 dB output SQNR, per-channel
    8-bit weights lose 0.9 dB)."""
    if config.equalize_relu6 is not None:
        return config.equalize_relu6
    return (config.weight or backend.weight).axis is None


def _unclip(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Replace each clipping activation by ``torch.relu`` of its input."""
    for node in nodes:
        with gm.graph.inserting_before(node):
            relu = gm.graph.call_function(torch.relu, (node.all_input_nodes[0],))
        relu.meta = dict(node.meta)
        node.replace_all_uses_with(relu)
        gm.graph.erase_node(node)
        if node.op == "call_module" and not any(n.op == "call_module" and n.target == node.target
                                                for n in gm.graph.nodes):
            gm.delete_submodule(node.target)
    gm.recompile()


def _output_sqnr(reference: object, output: object) -> float:
    """SQNR of ``output`` against ``reference`` over all their tensors (nested tuples, lists, dicts)."""
    ref, out = _flat(reference), _flat(output)
    return sqnr(torch.cat([t.reshape(-1) for t in ref]), torch.cat([t.reshape(-1) for t in out]))


def _flat(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float()]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [t for v in items for t in _flat(v)]
