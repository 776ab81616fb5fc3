"""prepare() misuse (issue 13 section 2): already quantized, pruned, weight-normed, hooked models and config
globs/arguments that match nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import weight_norm as legacy_weight_norm

import fxquant
from fxquant import Override, QuantConfig
from fxquant.errors import ConfigError, ExampleTypeError, ModelError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quiet_prepare(model, config=None, qat=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = fxquant.prepare_qat if qat else fxquant.prepare
        return fn(model, _x(), config=config)


def _int8_db(model: nn.Module) -> float:
    prepared = _quiet_prepare(model)
    qmodel = fxquant.convert(fxquant.calibrate(prepared, [_x(i) for i in range(4)], progress=False))
    with torch.no_grad():
        return fxquant.sqnr(model(_x(9)), qmodel(_x(9)))


@pytest.mark.parametrize("stage", ["prepared", "converted"])
def test_preparing_fxquants_own_output_is_refused(stage):
    prepared = _quiet_prepare(_net())
    model = prepared if stage == "prepared" else fxquant.convert(fxquant.calibrate(prepared, [_x()],
                                                                                    progress=False))
    with pytest.raises(ModelError, match=f"already {stage} by fxquant; prepare\\(\\) takes the original float"):
        fxquant.prepare(model, _x())


def test_a_pruned_model_is_answered_and_quantizes_after_prune_remove():
    model = _net()
    prune.l1_unstructured(model.conv, "weight", 0.5)
    with pytest.raises(ModelError, match=r"`conv` \(Conv2d\) is pruned.*prune.remove\(module, 'weight'\)"):
        fxquant.prepare(model, _x())
    prune.remove(model.conv, "weight")
    assert (model.conv.weight == 0).float().mean() == 0.5
    assert _int8_db(model) > 30


def test_legacy_weight_norm_is_answered():
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy_weight_norm(model.fc)
    with pytest.raises(ModelError, match=r"`fc` \(Linear\) uses the legacy torch.nn.utils.weight_norm.*"
                                         r"remove_weight_norm"):
        fxquant.prepare(model, _x())


def test_weight_norm_parametrizations_are_frozen_and_the_user_model_untouched():
    model = _net()
    parametrizations.weight_norm(model.conv)
    parametrizations.weight_norm(model.fc)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(_x(9))
    db = _int8_db(model)
    assert db > 30
    report = fxquant.report_of(_quiet_prepare(model))
    assert [s for s in report.skipped if "parametrization frozen" in s] == [
        "conv.weight: parametrization frozen to its current value", "fc.weight: parametrization frozen to its "
        "current value"]
    with torch.no_grad():
        assert torch.equal(model(_x(9)), expected)  # still parametrized and computing the same
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ModelError, match="quantization-aware training quantizes plain weights"):
        _quiet_prepare(model.train(), qat=True)


def test_hooks_on_a_folded_batchnorm_are_reported():
    model = _net()
    model.bn.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match=r"hooks registered on `bn` \(BatchNorm folded into its conv\) do not run "
                                         r"in the prepared model") as record:
        fxquant.prepare(model, _x())
    hook_warnings = [str(w.message) for w in record if "hooks registered" in str(w.message)]
    assert len(hook_warnings) == 1
    # a hook on the conv itself would see the folded output: that BatchNorm is not folded, with the reason
    model.conv.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match=r"BatchNorm `bn` not folded: `conv` \(Conv2d\): its weight is computed"):
        fxquant.prepare(model, _x())


@pytest.mark.parametrize(("config", "match"), [
    (QuantConfig(overrides=(Override("fc.*", exclude=True),)), r"Override glob\(s\) 'fc.\*' \(did you mean fc"),
    (QuantConfig(leaf_modules=("Encoder",)), r"QuantConfig.leaf_modules glob\(s\) 'Encoder'"),
    (QuantConfig(non_traceable=("head",)), r"QuantConfig.non_traceable glob\(s\) 'head'"),
])
def test_globs_that_match_nothing_are_named(config, match):
    with pytest.raises(ConfigError, match=match):
        fxquant.prepare(_net(), _x(), config=config)


def test_globs_that_match_classes_and_node_names_pass():
    config = QuantConfig(overrides=(Override("Linear", exclude=True), Override("flatten")))
    report = fxquant.report_of(_quiet_prepare(_net(), config))
    assert [e.node for e in report.float_ops] == ["fc"]


def test_unknown_concrete_args_name_the_forward_arguments():
    with pytest.raises(ConfigError, match=r"concrete_args names 'flag', which _Net.forward does not take \(its "
                                          r"arguments: x\)"):
        fxquant.prepare(_net(), _x(), config=QuantConfig(concrete_args={"flag": True}))


def test_numpy_examples_work_and_other_types_are_named():
    from_numpy = fxquant.report_of(_quiet_prepare_with(_x().numpy()))
    from_tensor = fxquant.report_of(_quiet_prepare_with(_x()))
    assert from_numpy.as_dict() == from_tensor.as_dict() and from_tensor.weight_quantizers == 2
    with pytest.raises(ExampleTypeError, match="example_inputs must be a tensor or a tuple of tensors, got NoneType"):
        fxquant.prepare(_net(), None)


def _quiet_prepare_with(example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(_net(), example)
