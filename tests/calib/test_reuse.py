"""The ranges pass reuses the buffers of element-wise ops nothing else reads (``fxquant.calib.reuse``): which ops
it writes in place, which it must not, and that the ranges are bit-identical to the out-of-place forward."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.calib import reuse
from fxquant.pipeline import ranges
from fxquant.quantizer import quantizers_of


class _Block(nn.Module):
    """A ResNet bottleneck as torchvision writes it: in-place ReLUs and ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = _Block()
        self.block2 = _Block()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(self.block2(self.block1(x)))


class _Hazards(nn.Module):
    """Values an in-place op must not overwrite: read twice, a view, a graph input, a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bias = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        a = torch.relu(y)          # y is read again below: out of place
        b = self.conv2(y) + self.bias  # written into conv2's output, never into the parameter
        v = a.flatten(2).relu()    # a view of a: out of place
        return a + torch.relu(x).sum() + v.sum() + b


def _prepare(model: nn.Module, backend: str, shape=(1, 3, 8, 8)) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(model.eval(), torch.randn(*shape), backend=backend)


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) * 3 for _ in range(n)]


def _ranges(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.amax.clone() for n, q in quantizers_of(model).items() if q.amax is not None}


def _calibrate_without_reuse(model: nn.Module, batches, monkeypatch) -> nn.Module:
    with monkeypatch.context() as m:
        m.setattr(ranges, "reusing_buffers", lambda _model, build=True: contextlib.nullcontext())
        return fxquant.calibrate(model, batches, progress=False)


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_relus_and_residual_adds_run_in_place_with_identical_ranges(backend, monkeypatch):
    torch.manual_seed(0)
    model = _Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    prepared = _prepare(model, backend)
    graph, count = reuse.reused_graph(prepared)
    # the stem's ReLU, each block's two ReLUs and its add: 1 + 2 * 3
    assert count == 7
    in_place = [n.target for n in graph.nodes if n.op == "call_function"]
    assert in_place.count(torch.relu_) == 5 and in_place.count(reuse.add_into) == 2

    expected = _ranges(_calibrate_without_reuse(_prepare(model, backend), _batches(), monkeypatch))
    got = _ranges(fxquant.calibrate(prepared, _batches(), progress=False))
    assert got.keys() == expected.keys() and len(got) >= 8
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    assert "forward" not in vars(prepared)  # the model's own forward is back
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(prepared(x), fxquant.convert(prepared)(x))


def test_values_read_elsewhere_views_inputs_and_parameters_stay_out_of_place(monkeypatch):
    prepared = _prepare(_Hazards(), "tensorrt")
    graph, count = reuse.reused_graph(prepared)
    targets = [n.target for n in graph.nodes if n.op in ("call_function", "call_method")]
    # relu(y) (y is read by conv2's quantizer too), relu(x) (a graph input) and the relu of a view stay out of
    # place; the three adds write into a fresh value read by them alone (conv2's output, add_1 and, through a
    # quantizer, add_2), the parameter and the scalar sums only being read
    assert count == 3
    assert targets.count(reuse.add_into) == 3 and torch.relu_ not in targets
    assert targets.count(torch.relu) == 2 and targets.count("relu") == 1
    expected = _ranges(_calibrate_without_reuse(_prepare(_Hazards(), "tensorrt"), _batches(), monkeypatch))
    got = _ranges(fxquant.calibrate(prepared, _batches(), progress=False))
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_a_broadcast_add_falls_back_out_of_place():
    a = torch.randn(1, 4, 1, 1)
    b = torch.randn(2, 4, 3, 3)
    out = reuse.add_into(a, b)
    assert out.shape == (2, 4, 3, 3) and torch.equal(out, a + b) and out.data_ptr() != a.data_ptr()
    half = torch.randn(2, 4, 3, 3).half()
    assert reuse.add_into(half, b).dtype == torch.float32  # type promotion: out of place
    c = torch.randn(2, 4, 3, 3)
    assert reuse.add_into(c, b).data_ptr() == c.data_ptr()


def test_a_hooked_producer_keeps_what_its_hook_saw():
    """fxquant's taps keep views of what a module returns: a hooked module's output is never written into."""
    prepared = _prepare(_Net(), "tensorrt")
    seen = []
    stem = prepared.get_submodule("stem")
    handle = stem.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        _, count = reuse.reused_graph(prepared)
        assert count == 6  # the stem's ReLU stays out of place
        fxquant.calibrate(prepared, _batches(), progress=False)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(bool((out < 0).any()) for out in seen)  # still the pre-ReLU values


def test_transient_statistics_taps_do_not_block_reuse():
    """A hook marked transient reduces what it sees on the spot (the input means, GPTQ's Hessians): the ranges
    pass keeps every in-place op, and the hook saw the values before any op wrote into them."""
    prepared = _prepare(_Net(), "onnxruntime")
    seen = []
    stem = prepared.get_submodule("stem")
    handle = stem.register_forward_hook(reuse.transient(lambda _m, _a, out: seen.append(float(out.min()))))
    try:
        _, count = reuse.reused_graph(prepared)
        assert count == 7  # the stem's ReLU in place too
        fxquant.calibrate(prepared, _batches(), progress=False)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(m < 0 for m in seen)  # the pre-ReLU values

def test_the_swap_needs_no_grad_and_no_global_hooks():
    prepared = _prepare(_Net(), "tensorrt")
    with reuse.reusing_buffers(prepared):
        assert "forward" not in vars(prepared)  # gradients on: nothing swapped
    with torch.no_grad():
        with reuse.reusing_buffers(prepared):
            assert "forward" in vars(prepared)
        assert "forward" not in vars(prepared)
        handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
        try:
            with reuse.reusing_buffers(prepared):
                assert "forward" not in vars(prepared)
        finally:
            handle.remove()


def test_the_rewrite_follows_changes_of_the_modules():
    """The cached forward is rebuilt when a module gains a hook (GPTQ's taps are set per calibration)."""
    prepared = _prepare(_Net(), "tensorrt")
    with torch.no_grad(), reuse.reusing_buffers(prepared):
        first = vars(prepared)["forward"].__func__
    handle = prepared.get_submodule("stem").register_forward_pre_hook(lambda *args: None)
    try:
        with torch.no_grad(), reuse.reusing_buffers(prepared):
            second = vars(prepared)["forward"].__func__
    finally:
        handle.remove()
    assert first is not second
    with torch.no_grad(), reuse.reusing_buffers(prepared):
        assert vars(prepared)["forward"].__func__ is not second


def test_the_in_place_forward_is_built_only_where_a_batch_repays_it():
    """One code generation per graph: not for a single batch; before the first of several known batches."""
    one = _prepare(_Net(), "tensorrt")
    fxquant.calibrate(one, _batches(1), progress=False)
    assert one not in reuse._CACHE
    seen = []
    several = _prepare(_Net(), "tensorrt")
    handle = several.get_submodule("head").register_forward_pre_hook(lambda m, a: seen.append("forward" in
                                                                                                vars(several)))
    fxquant.calibrate(several, _batches(2), progress=False)
    handle.remove()
    assert several in reuse._CACHE and seen == [True, True]  # both batches ran the in-place forward
    streamed = _prepare(_Net(), "tensorrt")
    seen.clear()
    handle = streamed.get_submodule("head").register_forward_pre_hook(lambda m, a: seen.append("forward" in
                                                                                                vars(streamed)))
    fxquant.calibrate(streamed, iter(_batches(3)), progress=False)
    handle.remove()
    assert seen == [False, True, True]  # an iterator of unknown length: from the second batch on
