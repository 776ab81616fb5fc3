"""QAT under DistributedDataParallel: two gloo ranks on CPU train a prepare_qat model (learned ranges that freeze
mid-run) and end with the parameters of one process training on the union of their batches.

The ranks are two subprocesses running this file as a script (``python tests/qat/test_qat_distributed.py RANK PORT
OUT``); the parent kills them after ``_TIMEOUT_S`` so a hung collective cannot block the suite.
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.cli.demo_model import DigitsNet
from tests.gloo_workers import spawn

WORLD, STEPS, BATCH, FREEZE_AFTER = 2, 4, 16, 2
_TIMEOUT_S = 120
CONFIG = QuantConfig(weight=QuantSpec(num_bits=4, axis=0, narrow_range=True, learn_amax=True),
                     activation=QuantSpec(num_bits=4, symmetric=False, learn_amax=True))


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A calibrated QAT model (learned ranges, frozen after FREEZE_AFTER steps) and its training data."""
    torch.manual_seed(0)
    model = DigitsNet(width=8).eval()
    x, y = torch.randn(STEPS * BATCH, 1, 8, 8), torch.randint(0, 10, (STEPS * BATCH,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_qat(model, x[:1], backend="onnxruntime", config=CONFIG,
                                       freeze_ranges_after=FREEZE_AFTER)
    fxquant.calibrate(prepared, [x[:32]], progress=False)  # every rank calibrates the same batch
    return prepared, x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shard: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fxquant.check_optimizer(model, opt)
    model.train()
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH][shard], y[step * BATCH:(step + 1) * BATCH][shard]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        prepared, x, y = _setup()
        half = BATCH // WORLD
        _train(DistributedDataParallel(prepared), x, y, slice(rank * half, (rank + 1) * half))
        torch.save({"state": prepared.state_dict(), "out": fxquant.convert(prepared)(x)}, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("qat_ddp")
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    return spawn(__file__, WORLD, lambda r, port, out: [str(r), str(port), str(out)], outs, _TIMEOUT_S,
                 "QAT DDP workers")


def test_ddp_ranks_agree_and_match_one_process_on_the_union(ranks):
    r0, r1 = ranks
    assert list(r0["state"]) == list(r1["state"])
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert torch.equal(r0["out"], r1["out"])
    prepared, x, y = _setup()
    start = {k: v.clone() for k, v in prepared.state_dict().items()}
    _train(prepared, x, y, slice(None))  # one process, the whole batch: DDP averages the same gradients
    want = prepared.state_dict()
    assert list(want) == list(r0["state"])
    for key, value in want.items():
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the ranges were learned under DDP, then froze (buffers, with their parameters kept at zero gradient)
    ranges = [k[:-len(".learned_max")] for k in want if k.endswith(".learned_max")]
    assert len(ranges) == 23  # every quantizer of the digits CNN (9 weight, 14 activation) learned its range
    for q in ranges:
        assert bool(want[f"{q}.ranges_frozen"]) and int(want[f"{q}.qat_steps"]) == FREEZE_AFTER, q
        assert torch.equal(want[f"{q}._max"], want[f"{q}.learned_max"]), q  # SGD leaves zero-gradient values
    moved = [q for q in ranges if not torch.equal(want[f"{q}._max"], start[f"{q}._max"])]
    assert len(moved) >= len(ranges) // 2, moved
    weight = "block1.pointwise.0.weight"
    assert not torch.equal(want[weight], start[weight])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
