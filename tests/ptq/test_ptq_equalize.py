"""Cross-layer equalization and high-bias absorption: float equivalence (randomized BatchNorm), chain detection,
convergence, and the skips (ReLU6, residual branches), each with its reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.ptq.chains import input_ranges, output_ranges
from fxquant.ptq.layers import float_mode
from tests.models.mobilenet_digits import MobileNetDigits


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            # channel scales spread over two decades, as after training a MobileNet
            m.weight.data.copy_(10 ** (torch.rand(n, generator=g) * 2 - 1) * torch.sign(torch.randn(n, generator=g)))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class Tricky(nn.Module):
    """conv -> maxpool -> grouped conv -> depthwise -> 1x1 conv -> flatten (4x4 spatial) -> linear -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc1 = nn.Linear(6 * 16, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        x = self.dw(torch.relu(self.bn2(self.grouped(x))))
        x = self.pw(nn.functional.relu(x))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class Residual(nn.Module):
    """stem -> [conv1 -> relu -> conv2] + stem: the stem's output has two users and is not equalized."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        return s + self.conv2(torch.relu(self.conv1(s)))


class WithReLU6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.act = nn.ReLU6()
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def _float_output(prepared, x):
    with float_mode(prepared), torch.no_grad():
        return prepared(x)


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max())


CASES = {
    "mobilenet": (lambda: MobileNetDigits(), (4, 1, 8, 8),
                  [["features.0", "features.3", "features.6", "features.9", "features.12", "features.15",
                    "features.18", "fc"]]),
    "tricky": (lambda: Tricky(), (4, 3, 8, 8), [["conv", "grouped", "dw", "pw", "fc1", "fc2"]]),
    "residual": (lambda: Residual(), (2, 3, 8, 8), [["conv1", "conv2"]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equalization_preserves_the_float_function(case):
    build, shape, chains = CASES[case]
    torch.manual_seed(0)
    model = randomize_bn(build())
    x = torch.randn(*shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    prepared = fxquant.prepare(model, x[:1], config=fxquant.QuantConfig(equalize=True))
    report = fxquant.report_of(prepared).ptq["equalize"]
    assert report.data["chains"] == chains
    assert _rel_err(ref, _float_output(prepared, x)) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # user model untouched
    for layers in chains:  # the worst per-channel range ratio of the chain drops (randomized BN: > 100)
        stats = [report.data["layers"][name] for name in layers]
        worst_before, worst_after = (max(s[k] for s in stats) for k in ("imbalance_before", "imbalance_after"))
        assert worst_after <= 1.0001 * worst_before
        if case != "residual":  # no BatchNorm there: nothing to balance
            assert worst_before > 100 and worst_after < worst_before / 5


def test_chain_converges_to_equal_ranges_on_every_link():
    torch.manual_seed(0)
    model = randomize_bn(Tricky())
    prepared = fxquant.prepare(model, torch.randn(1, 3, 8, 8), config=fxquant.QuantConfig(equalize=True))
    report = fxquant.report_of(prepared).ptq["equalize"]
    assert "converged" in report.done[0] and "not converged" not in report.done[0]
    m = dict(prepared.named_modules())
    pairs = [("conv", "grouped", 1), ("grouped", "dw", 1), ("dw", "pw", 1), ("pw", "fc1", 16), ("fc1", "fc2", 1)]
    for a, b, repeat in pairs:  # the fixed point of DFQ: r_a(c) == r_b(c) for all links at once
        r_a, r_b = output_ranges(m[a]), input_ranges(m[b], repeat)
        assert torch.allclose(r_a, r_b, rtol=1e-3), (a, b)
    # before equalization the first link was far from balanced
    raw = randomize_bn(Tricky())
    fb = fxquant.prepare(raw, torch.randn(1, 3, 8, 8))
    mr = dict(fb.named_modules())
    assert not torch.allclose(output_ranges(mr["conv"]), input_ranges(mr["grouped"]), rtol=0.1)


def test_residual_and_relu6_are_skipped_with_reasons():
    torch.manual_seed(0)
    prepared = fxquant.prepare(Residual().eval(), torch.randn(1, 3, 8, 8), config=fxquant.QuantConfig(equalize=True))
    skipped = fxquant.report_of(prepared).ptq["equalize"].skipped
    assert any("`stem`" in s and "2 users" in s for s in skipped), skipped
    prepared = fxquant.prepare(WithReLU6().eval(), torch.randn(1, 3, 4, 4), config=fxquant.QuantConfig(equalize=True))
    report = fxquant.report_of(prepared).ptq["equalize"]
    assert report.done == [] and report.data["chains"] == []
    assert any("ReLU6 is not positively homogeneous" in s for s in report.skipped), report.skipped
    assert "ReLU6" in fxquant.report_of(prepared).summary()


class AlwaysOn(nn.Module):
    """1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> linear, for exact high-bias absorption."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(torch.flatten(x, 1))


@torch.no_grad()
def test_high_bias_absorption_is_exact_where_its_premise_holds():
    torch.manual_seed(0)
    model = randomize_bn(AlwaysOn())
    # |a(x)| <= 1 for x in [-1, 1] (rows with L1 norm 1); with running var 1/9 the normalized value is in
    # [-3, 3], so channels with beta >= 3 |gamma| are on for every input: mean - 3 std is always absorbed
    w = torch.randn(8, 4, 1, 1)
    model.a.weight.copy_(w / w.abs().sum(1, keepdim=True))
    model.bn_a.running_mean.zero_()
    model.bn_a.running_var.fill_(1 / 9)
    model.bn_a.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3, 1.0, 1.0, 0.7]))
    model.bn_a.bias.copy_(torch.tensor([5.0, 4.0, 9.0, -1.0, 0.2, 3.5, 0.0, 2.5]))
    x = torch.rand(16, 4, 3, 3) * 2 - 1
    ref = model(x)
    config = fxquant.QuantConfig(equalize=True, absorb_bias=True)
    prepared = fxquant.prepare(model, x[:1], config=config)
    report = fxquant.report_of(prepared).ptq["bias_absorption"]
    assert any(line.startswith("`a` -> `b`: moved bias of 5 channel(s)") for line in report.done), report.done
    assert _rel_err(ref, _float_output(prepared, x)) < 1e-4
    # the absorbed bias is gone from `a`: each always-on channel's minimum output is now ~0
    with float_mode(prepared):
        pre = prepared.a(x)
    on = [0, 1, 2, 5, 7]
    assert float(pre[:, on].amin(dim=(0, 2, 3)).max()) < 3.0 * 0.3 + 1e-3


def test_config_validation():
    with pytest.raises(TypeError, match="equalize"):
        fxquant.QuantConfig(equalize=1)
    with pytest.raises(ValueError, match="fold_bn"):
        fxquant.QuantConfig(equalize=True, fold_bn=False)
    with pytest.raises(ValueError, match="bias_correction"):
        fxquant.QuantConfig(bias_correction="magic")
    with pytest.raises(TypeError, match="adaround"):
        fxquant.QuantConfig(adaround=3)
    with pytest.raises(ValueError, match="iterations"):
        fxquant.AdaRoundOptions(iterations=0)
