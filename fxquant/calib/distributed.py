"""Distributed calibration: every rank calibrates its own shard, then the calibrators' statistics are merged.

``fxquant.calibrate`` calls :func:`sync_calibrators` by itself whenever ``torch.distributed`` is available and
initialized, after running the local batches and before turning statistics into ranges. Every rank then ends
with identical quantization parameters. Run it under ``torchrun``::

    # calib.py -- torchrun --nproc_per_node=2 calib.py
    import torch, torch.distributed as dist, fxquant
    dist.init_process_group("gloo")              # or "nccl" after torch.cuda.set_device(local_rank)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()                        # the same model (same weights) on every rank
    prepared = fxquant.prepare(model, example, backend="tensorrt")
    shard = batches[rank::world]                 # or a DataLoader with a DistributedSampler
    fxquant.calibrate(prepared, shard)           # collective: every rank must call it
    if rank == 0:
        fxquant.export_onnx(fxquant.convert(prepared), example, "model.onnx")
    dist.destroy_process_group()

What the merge gives, per calibrator:

- ``max`` (per tensor or per channel): all-reduce MIN of the minima and MAX of the maxima -- exactly the range
  one process calibrating the union of the shards finds.
- histogram methods (``percentile``, ``entropy``, ``mse``): every rank widens its histogram to the largest
  power-of-two range of any rank (``HistogramCalibrator.widen_to``), the histograms are summed and the exact
  minima/maxima reduced. Binning is exact (see ``fxquant.calib.histogram``), so the merged histogram is
  bit-for-bit the one a single process collects from the union, whatever the batch order, and so is every
  range derived from it -- also later, with ``fxquant.load_calib_amax`` (no communication needed then).
- ``ema``: an exponential moving average depends on the order of the batches, so no merge equals the union.
  The merged range is the mean over the ranks that saw data of each rank's bias-corrected EMA, and
  ``num_batches`` becomes the largest batch count of any rank. With equal batch counts per rank this equals
  the all-reduce SUM / world size of the un-corrected averages, corrected with that count.

Rules:

- Every rank must call ``calibrate`` (it is a collective) on a model prepared the same way: the ranks
  all-gather the ordered list of (quantizer name, calib_method, axis) and each quantizer's QuantSpec, and all
  of them raise ``CalibrationError`` naming the first difference if they disagree.
- A rank may have zero batches (its calibrators contribute nothing; per-channel shapes come from the other
  ranks), but if all ranks together have none, ``calibrate`` raises its empty-iterable error on every rank.
- ``calibrate`` merges over the default (world) process group; to merge within a subgroup, collect with
  ``TensorQuantizer.set_mode("calib")`` yourself and call ``sync_calibrators(quantizers, n, group=...)``.
- The merge is deterministic: quantizers are reduced in sorted name order, in three collectives (one
  ``all_gather_object`` and two ``all_reduce``), on CPU for gloo and on the current CUDA device for NCCL.
- Every rank must reach ``calibrate`` within ``ARRIVAL_TIMEOUT_S`` seconds of the first one (environment variable
  ``FXQUANT_ARRIVAL_TIMEOUT_S``, default 300): a rank waiting longer raises ``CalibrationError`` naming how many
  ranks arrived, instead of hanging until the process group's timeout (the common ``if rank == 0:
  fxquant.calibrate(...)``). To calibrate on one rank only, pass ``calibrate(..., distributed=False)``.
- Every rank must hold the same weights: the ranges of the weight quantizers are compared, and ranks whose
  weights differ raise ``CalibrationError`` naming the first such weight (its range on each rank).
- An exception on one rank before the merge (a NaN batch, a crashing forward) leaves the other ranks waiting in
  the collective until the process group's timeout, or until torchrun tears the job down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fxquant.calib.base import has_stats
from fxquant.errors import CalibrationError

if TYPE_CHECKING:
    from torch import nn

    from fxquant.quantizer import TensorQuantizer


ARRIVAL_TIMEOUT_S = float(os.environ.get("FXQUANT_ARRIVAL_TIMEOUT_S", "300"))
_CALLS = itertools.count()  # every rank numbers its calibrate calls alike: the n-th call meets the n-th


def await_ranks(timeout_s: float | None = None) -> None:
    """Wait until every rank of the world has entered ``calibrate`` (a counter in the default store); raise
    CalibrationError after ``timeout_s`` instead of hanging in the first collective until the group's timeout."""
    timeout_s = ARRIVAL_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # a process group without a store: the collectives' own timeout applies
        return
    world, key = dist.get_world_size(), f"fxquant/calibrate/{next(_CALLS)}"
    arrived = store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while arrived < world:
        if time.monotonic() > deadline:
            raise CalibrationError(f"only {arrived} of {world} ranks called fxquant.calibrate within {timeout_s:g} s "
                                   f"(this is rank {dist.get_rank()}): under torch.distributed calibrate is a "
                                   "collective that merges every rank's statistics, so every rank must call it. To "
                                   "calibrate on one rank only (e.g. under `if rank == 0:`), pass "
                                   "fxquant.calibrate(prepared, batches, distributed=False); a slow rank: raise "
                                   "FXQUANT_ARRIVAL_TIMEOUT_S")
        time.sleep(0.02)
        arrived = store.add(key, 0)


def is_distributed() -> bool:
    """True when calibration should merge statistics across ranks (torch.distributed is initialized)."""
    return dist.is_available() and dist.is_initialized()


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_info(quantizers: dict[str, TensorQuantizer], local_batches: int) -> dict[str, Any]:
    """What every rank tells the others: the graph signature, specs and the shape of each local statistic."""
    entries = []
    for name, q in quantizers.items():
        has_data = q.spec.amax is None and has_stats(q.calibrator)
        lo, hi = q.calibrator.minmax() if has_data else (None, None)
        finite = not has_data or bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
        entries.append({
            "key": (name, q.spec.calib_method, q.spec.axis),
            "spec": q.spec,
            "shape": tuple(lo.shape) if has_data else None,
            "num_batches": q.calibrator.num_batches if has_data else 0,
            "meta": q.calibrator.merge_meta() if has_data else None,
            "finite": finite,
            "weights": _digest(lo, hi) if has_data and q.constant else None,
        })
    return {"batches": int(local_batches), "entries": entries}


def _digest(lo: torch.Tensor, hi: torch.Tensor) -> tuple[str, float]:
    """A weight quantizer's statistics as (exact digest, amax): equal on ranks holding the same weights."""
    both = torch.cat([lo.detach().float().flatten(), hi.detach().float().flatten()]).cpu()
    return hashlib.sha256(both.numpy().tobytes()).hexdigest(), float(both.abs().max())


def _describe(key: tuple) -> str:
    name, method, axis = key
    return f"`{name}` (calib_method={method!r}, axis={axis})"


def _check_agreement(infos: list[dict[str, Any]]) -> None:
    """Raise CalibrationError naming the first difference between rank 0's quantizers and another rank's."""
    ref = infos[0]["entries"]
    hint = ("; every rank must prepare the same model with the same backend and QuantConfig before calibrating "
            "in a distributed run")
    for rank, info in enumerate(infos[1:], start=1):
        other = info["entries"]
        for i, (a, b) in enumerate(zip(ref, other, strict=False)):
            if a["key"] != b["key"]:
                raise CalibrationError(f"ranks disagree on the quantized graph at quantizer #{i}: rank 0 has "
                                       f"{_describe(a['key'])}, rank {rank} has {_describe(b['key'])}{hint}")
            if a["spec"] != b["spec"]:
                fields = [f.name for f in dataclasses.fields(a["spec"])
                          if getattr(a["spec"], f.name) != getattr(b["spec"], f.name)]
                diffs = ", ".join(f"{f}={getattr(a['spec'], f)!r} on rank 0 but {getattr(b['spec'], f)!r} on rank "
                                  f"{rank}" for f in fields)
                raise CalibrationError(f"ranks disagree on the QuantSpec of quantizer `{a['key'][0]}`: {diffs}{hint}")
        if len(ref) != len(other):
            longer, extra = (0, ref[len(other)]) if len(ref) > len(other) else (rank, other[len(ref)])
            raise CalibrationError(f"ranks disagree on the quantized graph: rank 0 has {len(ref)} quantizers, rank "
                                   f"{rank} has {len(other)}; the first one only rank {longer} has is "
                                   f"{_describe(extra['key'])}{hint}")
    for rank, info in enumerate(infos[1:], start=1):  # the same graph: now the same weights
        for a, b in zip(ref, info["entries"], strict=True):
            if a["weights"] and b["weights"] and a["weights"][0] != b["weights"][0]:
                raise CalibrationError(f"ranks hold different weights: `{a['key'][0]}` sees a weight of amax "
                                       f"{a['weights'][1]:.6g} on rank 0 but {b['weights'][1]:.6g} on rank {rank}; "
                                       "merging their statistics would calibrate no model. Load the same weights on "
                                       "every rank (seed before building the model, or load one checkpoint) before "
                                       "calibrate")


def sync_calibrators(quantizers: dict[str, TensorQuantizer], local_batches: int = 0, group: Any = None,
                     device: torch.device | None = None) -> int:
    """Merge every quantizer's calibrator statistics across the ranks of ``group`` (default: the world).

    Call it on every rank after collecting the local batches and before ``load_calib_amax``; ``local_batches``
    is how many batches this rank ran. Returns the total batch count over all ranks (0: nothing was merged).
    ``device`` is where statistics land on a rank that saw no data (default: the communication device).
    Raises ``CalibrationError`` on every rank if the ranks disagree on the quantizers or per-channel shapes.
    """
    world = dist.get_world_size(group)
    infos: list[Any] = [None] * world
    dist.all_gather_object(infos, _local_info(quantizers, local_batches), group=group)
    _check_agreement(infos)
    total = sum(info["batches"] for info in infos)
    if total == 0:
        return 0
    comm = _comm_device(group)
    names = list(quantizers)
    per_name = {name: [info["entries"][i] for info in infos] for i, name in enumerate(names)}

    # ---- plan: what each quantizer contributes, in sorted name order -------------------------------------
    plan = []  # (name, shape of the statistics, every rank's merge_meta)
    for name in sorted(names):
        q, entries = quantizers[name], per_name[name]
        if q.spec.amax is not None:
            continue  # a fixed range: nothing was collected
        if not q.calibrator.mergeable:
            raise CalibrationError(f"quantizer `{name}` uses a {type(q.calibrator).__name__}, which distributed "
                                   "calibration cannot merge across ranks")
        shapes = {e["shape"] for e in entries if e["shape"] is not None}
        if not shapes:
            continue  # no rank ran this quantizer: calibrate reports it
        if len(shapes) > 1:
            seen = ", ".join(f"{e['shape']} on rank {r}" for r, e in enumerate(entries) if e["shape"] is not None)
            raise CalibrationError(f"quantizer `{name}` collected statistics of different shapes on different "
                                   f"ranks ({seen}): the per-channel count must be the same on every rank")
        plan.append((name, shapes.pop(), [e["meta"] for e in entries]))

    # ---- pack: each calibrator's minima (one MIN) and sums (one SUM) ---------------------------------------
    mins, sums = [], []
    for name, shape, metas in plan:
        to_min, to_sum = quantizers[name].calibrator.merge_parts(shape, metas)
        mins += to_min
        sums += to_sum
    packed_min = _all_reduce([t.to(comm) for t in mins], dist.ReduceOp.MIN, group, torch.float32, comm)
    packed_sum = _all_reduce([t.to(comm) for t in sums], dist.ReduceOp.SUM, group, torch.float64, comm)

    # ---- unpack into every rank's calibrators ------------------------------------------------------------
    at_min = at_sum = 0
    for name, shape, _ in plan:
        cal, entries = quantizers[name].calibrator, per_name[name]
        stats = cal.minmax()
        target = stats[0].device if stats is not None else (device or comm)
        n_min, n_sum = cal.merge_sizes(shape)
        cal.merge(packed_min[at_min:at_min + n_min], packed_sum[at_sum:at_sum + n_sum], shape,
                  [e["num_batches"] for e in entries], all(e["finite"] for e in entries), target)
        at_min, at_sum = at_min + n_min, at_sum + n_sum
    return total


def _all_reduce(parts: list[torch.Tensor], op: Any, group: Any, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=dtype, device=device)
    packed = torch.cat([p.to(dtype) for p in parts])
    dist.all_reduce(packed, op=op, group=group)
    return packed
