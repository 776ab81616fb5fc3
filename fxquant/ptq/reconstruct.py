"""Reconstruction: AdaRound's learned rounding (``fxquant.ptq.rounding``) fitted block by block (BRECQ, Li et al.
2021) with activation quantization in the loop, dropped at random (QDrop, Wei et al. 2022).

The samples are streamed from the calibration batches once (at most ``num_samples``) and pushed through the model
block by block (``fxquant.ptq.blocks``), holding two values per crossing tensor: the float model's (every
quantizer off, float weights) and the quantized model's (earlier blocks already rounded). For each block, the
float path gives the target; the rounding variables of the block's weights are fitted with Adam so that the block,
fed with a random element-wise mix of the two inputs and with each of its activation quantizers dropped per
element with probability ``act_drop``, reproduces the target; then the learned codes replace the weights and the
quantized path moves on. Each block is run a few times over the samples and trained for ``iterations`` steps,
instead of a whole-model forward over every batch per layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import fx
from tqdm.auto import tqdm

from fxquant.capture.trace import normalize_inputs
from fxquant.ptq.blocks import ROWS, Block, block_module, data_nodes, find_blocks, probe
from fxquant.ptq.fit import fit, take
from fxquant.ptq.layers import float_mode
from fxquant.ptq.rounding import harden, rounding_for
from fxquant.report import PTQReport
from fxquant.spec import AdaRoundOptions

CHUNK = 32  # samples per forward when a block runs over all samples
SCORED = 64  # samples the per-block errors of the report are measured on (the first ones)


def take_samples(batches: Iterable, limit: int) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """The model inputs of the first ``limit`` samples of ``batches`` (read once, stopping there), concatenated
    along the batch dimension; batches whose inputs differ in shape from the first one's are left out (noted)."""
    parts: list[tuple[torch.Tensor, ...]] = []
    notes: list[str] = []
    count = 0
    for index, batch in enumerate(batches):
        inputs = tuple(normalize_inputs(batch))
        if parts and [x.shape[1:] for x in inputs] != [x.shape[1:] for x in parts[0]]:
            notes.append(f"calibration batch {index}: its input shapes differ from the first batch's; not used for "
                         "reconstruction")
            continue
        take = min(inputs[0].shape[0], limit - count)
        parts.append(tuple(x[:take].detach() for x in inputs))
        count += take
        if count >= limit:
            break
    if not parts:
        return (), notes
    return tuple(torch.cat(xs) for xs in zip(*parts, strict=True)), notes


def reconstruct(gm: fx.GraphModule, layers: list, samples: tuple[torch.Tensor, ...], options: AdaRoundOptions,
                report: PTQReport, progress: bool) -> dict[str, torch.Tensor]:
    """Fit the rounding of ``layers`` of ``gm`` on ``samples``, block by block, in place; returns each layer's
    codes and records per block what it gained in ``report``."""
    with float_mode(gm):
        kinds = probe(gm, samples)
    blocks = find_blocks(gm, layers, options.granularity, kinds)
    placeholders = [n for n in data_nodes(gm.graph) if n.op == "placeholder"]
    fp: dict[fx.Node, object] = dict(zip(placeholders, samples, strict=False))
    for n, kind in kinds.items():  # values that are not per-sample tensors: the sample count, or constants
        if kind != ROWS:
            fp[n] = kind
    q = dict(fp)
    last_block = {n: i for i, block in enumerate(blocks) for n in block.inputs}
    codes: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    steps = options.iterations * sum(1 for b in blocks if b.layers)
    generator = torch.Generator().manual_seed(options.seed)
    with tqdm(total=steps, desc="fxquant adaround", unit="step", disable=not progress) as bar:
        for i, block in enumerate(blocks):
            start = time.perf_counter()
            module = block_module(gm, block)
            fp_in, q_in = [fp[n] for n in block.inputs], [q[n] for n in block.inputs]
            with float_mode(gm):
                targets = _run(module, fp_in)
            pairs = [(layer, soft) for layer in block.layers if (soft := rounding_for(layer)) is not None]
            scored = slice(0, min(SCORED, targets[0].shape[0]))  # the samples the report's errors are over
            before = _error(_run(module, q_in, scored.stop), [t[scored] for t in targets]) if pairs else 0.0
            if pairs:
                bar.set_postfix_str(block.name, refresh=False)
                fitting = time.perf_counter()
                learned = fit(gm, block, pairs, (fp_in, q_in, targets), options, generator, bar)
                entry = stats.setdefault(block.name, {"layers": {}})
                entry.update({"fit_seconds": time.perf_counter() - fitting, "activation_steps": learned})
                for layer, soft in pairs:
                    codes[layer.name] = harden(layer, soft)
                    flipped = float((codes[layer.name] != soft.nearest).float().mean())
                    stats.setdefault(block.name, {"layers": {}})["layers"][layer.name] = {"flipped": flipped}
            outputs = _run(module, q_in)
            after = _error([o[scored] for o in outputs], [t[scored] for t in targets])
            for n, f, v in zip(block.outputs, targets, outputs, strict=True):
                fp[n], q[n] = f, v
            for n in [n for n in fp if last_block.get(n, -1) <= i and n not in block.outputs
                      and isinstance(fp[n], torch.Tensor)]:
                del fp[n], q[n]  # read by no later block
            seconds = time.perf_counter() - start
            if pairs:
                _record(report, stats, block, before, after, seconds)
            del module, targets
    return codes


def _record(report: PTQReport, stats: dict, block: Block, before: float, after: float, seconds: float) -> None:
    entry = stats[block.name]
    entry.update({"mse_nearest": before, "mse_reconstructed": after, "seconds": seconds})
    gain = before / after if after > 0 else math.inf
    report.done.append(f"`{block.name}` ({len(entry['layers'])} layer{'s' if len(entry['layers']) > 1 else ''}): "
                       f"output MSE {before:.3g} (nearest) -> {after:.3g} ({gain:.2g}x) in {seconds:.1f} s")
    report.data.setdefault("blocks", {})[block.name] = entry


@torch.no_grad()
def _run(module: fx.GraphModule, inputs: Sequence[object], limit: int | None = None) -> list[torch.Tensor]:
    """``module`` over all samples (the first ``limit``) in chunks; its outputs concatenated."""
    n = next(v.shape[0] for v in inputs if isinstance(v, torch.Tensor))
    n = n if limit is None else min(n, limit)
    parts = [module(*take(inputs, slice(i, i + CHUNK))) for i in range(0, n, CHUNK)]
    return [torch.cat(list(xs)) for xs in zip(*parts, strict=True)]


def _error(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Mean squared error over every output element."""
    total = sum(float((o.float() - t.float()).pow(2).sum()) for o, t in zip(outputs, targets, strict=True))
    return total / max(sum(t.numel() for t in targets), 1)
