"""Distributed calibration misuse (issue 13 section 2): two gloo ranks (subprocesses running this file).

- ranks whose models hold different weights raise on both ranks, naming the weight;
- calibrate on rank 0 only (``if rank == 0:``) raises after the arrival timeout instead of hanging until the
  process group's timeout, and ``distributed=False`` calibrates that rank alone.
"""

from __future__ import annotations

import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch
from torch import nn

import fxquant
from tests.gloo_workers import spawn

WORLD = 2
_ARRIVAL_S = 3.0


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(4)]


def _prepare(seed: int) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(_model(seed), _batches()[0])


def _scales(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.scale.clone() for n, q in prepared.named_modules() if isinstance(q, fxquant.TensorQuantizer)}


def _calibrate(prepared: nn.Module, **kwargs) -> dict:
    start = time.monotonic()
    try:
        fxquant.calibrate(prepared, _batches(), progress=False, **kwargs)
    except fxquant.CalibrationError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"scales": _scales(prepared), "seconds": time.monotonic() - start}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from fxquant.calib import distributed as dist_calib

    torch.set_num_threads(1)
    dist_calib.ARRIVAL_TIMEOUT_S = _ARRIVAL_S
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    results = {}
    try:
        results["different-weights"] = _calibrate(_prepare(seed=rank))
        if rank == 0:  # the common mistake: only rank 0 calibrates, the others wait at a barrier
            results["rank0-only"] = _calibrate(_prepare(seed=0))
            results["rank0-opt-out"] = _calibrate(_prepare(seed=0), distributed=False)
        dist.barrier()
    finally:
        torch.save(results, out)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("misuse-dist")
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    return spawn(__file__, WORLD, lambda r, port, out: [str(r), str(port), str(out)], outs, 200,
                 "distributed misuse workers")


def test_ranks_with_different_weights_raise_on_every_rank(ranks):
    for rank in ranks:
        error = rank["different-weights"]["error"]
        assert "ranks hold different weights: `0.weight_quantizer` sees a weight of amax" in error
        assert "Load the same weights on every rank" in error


def test_calibrate_on_rank_0_only_raises_instead_of_hanging(ranks):
    got = ranks[0]["rank0-only"]
    assert "only 1 of 2 ranks called fxquant.calibrate within 3 s (this is rank 0)" in got["error"]
    assert "distributed=False" in got["error"]
    assert _ARRIVAL_S <= got["seconds"] < _ARRIVAL_S + 30  # not the process group's 120 s timeout
    assert "rank0-only" not in ranks[1]


def test_distributed_false_calibrates_one_rank_alone(ranks):
    got = ranks[0]["rank0-opt-out"]["scales"]
    want = _scales(fxquant.calibrate(_prepare(seed=0), _batches(), progress=False))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
