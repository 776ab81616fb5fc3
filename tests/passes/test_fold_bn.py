"""BatchNorm folding: float equivalence for every foldable pair, and the pairs that must not be folded."""

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.capture.trace import propagate_shapes, trace
from fxquant.passes.fold_bn import fold_bn


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.1)
        bn.weight.copy_(torch.randn(n, generator=gen))
        bn.bias.copy_(torch.randn(n, generator=gen))


class _Pair(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


def _fold(model: nn.Module, x: torch.Tensor, strict: bool = False):
    gm = trace(model)
    propagate_shapes(gm, (x,))
    result = fold_bn(gm, strict=strict)
    result.gm.graph.lint()
    result.gm.recompile()
    return result


def _targets(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


CASES = {
    "conv1d": (lambda: _Pair(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (2, 3, 11)),
    "conv2d": (lambda: _Pair(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)), (2, 3, 9, 9)),
    "conv2d_no_bias": (lambda: _Pair(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 3, 9, 9)),
    "conv3d": (lambda: _Pair(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (1, 2, 5, 6, 7)),
    "depthwise_conv2d": (lambda: _Pair(nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6)), (2, 6, 8, 8)),
    "conv_transpose2d_groups2": (lambda: _Pair(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
                                 (2, 4, 5, 5)),
    "conv_transpose1d_no_bias": (lambda: _Pair(nn.ConvTranspose1d(3, 4, 2, stride=2, bias=False),
                                               nn.BatchNorm1d(4)), (2, 3, 7)),
    "linear": (lambda: _Pair(nn.Linear(7, 5), nn.BatchNorm1d(5)), (4, 7)),
}


@pytest.mark.smoke
@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_is_float_equivalent(case):
    make, shape = CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    torch.manual_seed(sum(map(ord, case)))
    model = make()
    _randomize_bn(model.bn, gen)
    model.eval()
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        ref = model(x)
    result = _fold(model, x)
    gm = result.gm
    assert result.modified is True
    assert result.notes == []
    assert _targets(gm) == ["conv"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    conv_node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert conv_node.meta["fxquant"].folded_bn == "bn"
    assert gm.conv.bias is not None
    with torch.no_grad():
        out = gm(x)
    assert out.shape == ref.shape
    rel = (out - ref).abs().max().item() / ref.abs().max().item()
    assert rel < 1e-4
    # the source model keeps its BatchNorm and its conv's weight
    assert isinstance(model.bn, nn.modules.batchnorm._BatchNorm)
    assert not torch.equal(gm.conv.weight, model.conv.weight)


def test_fold_without_affine_bn():
    gen = torch.Generator().manual_seed(3)
    model = _Pair(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)).eval()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4, generator=gen))
        model.bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    ref = model(x).detach()
    gm = _fold(model, x).gm
    assert _targets(gm) == ["conv"]
    assert (gm(x) - ref).abs().max().item() / ref.abs().max().item() < 1e-4


class _SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_used_elsewhere_is_not_folded():
    model = _SharedOutput().eval()
    _randomize_bn(model.bn, torch.Generator().manual_seed(1))
    x = torch.randn(1, 3, 6, 6)
    ref = model(x).detach()
    with pytest.warns(UserWarning) as record:
        result = _fold(model, x)
    messages = [str(w.message) for w in record]
    assert messages == ["BatchNorm `bn` not folded: the output of `conv` is also used outside `bn`"]
    assert result.notes == messages
    assert result.modified is False
    assert _targets(result.gm) == ["conv", "bn"]
    assert torch.equal(result.gm(x), ref)


def test_conv_output_used_elsewhere_strict_raises_pass_error():
    model = _SharedOutput().eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(fxquant.PassError, match=r"BatchNorm `bn` not folded: the output of `conv` is also used"):
        _fold(model, x, strict=True)


def test_strict_through_prepare_raises_pass_error_and_user_model_unchanged():
    model = _SharedOutput().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxquant.PassError, match=r"BatchNorm `bn` not folded"):
        fxquant.prepare(model, torch.randn(1, 3, 6, 6), config=fxquant.QuantConfig(strict=True))
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_in_training_mode_is_not_folded():
    model = _Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"BatchNorm `bn` not folded: `bn` is in training mode.*call model\.eval\(\)"):
        result = _fold(model, x)
    assert result.modified is False
    assert _targets(result.gm) == ["conv", "bn"]
    with pytest.raises(fxquant.PassError, match=r"call model\.eval\(\) first"):
        _fold(model, x, strict=True)


def test_conv_called_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    model = Twice().eval()
    _randomize_bn(model.bn, torch.Generator().manual_seed(2))
    x = torch.randn(1, 4, 5, 5)
    ref = model(x).detach()
    with pytest.warns(UserWarning, match=r"BatchNorm `bn` not folded: `conv` is called at 2 places"):
        result = _fold(model, x)
    assert result.modified is False
    assert _targets(result.gm) == ["conv", "conv", "bn"]
    assert torch.equal(result.gm(x), ref)


def test_bn_called_twice_is_not_folded():
    class SharedBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    model = SharedBN().eval()
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning) as record:
        result = _fold(model, x)
    assert {str(w.message) for w in record} == {"BatchNorm `bn` not folded: `bn` is called at 2 places"}
    assert result.notes == ["BatchNorm `bn` not folded: `bn` is called at 2 places"] * 2  # one per call site
    assert result.modified is False


def test_skip_message_names_nested_modules_by_their_path():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = nn.Sequential(Block(), Block().train())
    model[0].eval()
    model[1].conv = nn.Conv2d(4, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning) as record:
        result = _fold(model, x)
    assert [str(w.message) for w in record] == [
        "BatchNorm `1.bn` not folded: `1.bn` is in training mode, so it normalizes with batch statistics; "
        "call model.eval() first"]
    assert _targets(result.gm) == ["0.conv", "1.conv", "1.bn"]


def test_linear_bn_on_3d_tensor_is_not_folded():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Linear(6, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.conv(x))  # BatchNorm1d normalizes axis 1 (the sequence), not the features

    model = Seq().eval()
    _randomize_bn(model.bn, torch.Generator().manual_seed(4))
    x = torch.randn(2, 6, 6)
    ref = model(x).detach()
    with pytest.warns(UserWarning, match=r"BatchNorm `bn` not folded: `bn` after Linear normalizes a non-2D tensor"):
        result = _fold(model, x)
    assert _targets(result.gm) == ["conv", "bn"]
    assert torch.equal(result.gm(x), ref)


def test_prepare_folds_bn_and_leaves_user_model_alone():
    class ConvBNReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))

    model = ConvBNReLU().eval()
    _randomize_bn(model.bn, torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a foldable model folds without any warning
        prepared = fxquant.prepare(model, torch.randn(1, 3, 8, 8))
    assert fxquant.report_of(prepared).folded_bn == ["bn"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert isinstance(model.bn, nn.BatchNorm2d)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # with fold_bn=False the BatchNorm stays in the prepared graph
    kept = fxquant.prepare(model, torch.randn(1, 3, 8, 8), config=fxquant.QuantConfig(fold_bn=False))
    assert fxquant.report_of(kept).folded_bn == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
