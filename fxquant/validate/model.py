"""Validation of the model given to ``prepare``: not fxquant's own output, no pruning hooks, hooks that would
not run."""

from __future__ import annotations

import warnings

from torch import fx, nn
from torch.nn.utils import parametrize

from fxquant.errors import ModelError
from fxquant.lower.frozen import FrozenQuantizer
from fxquant.quantizer import TensorQuantizer
from fxquant.state import get_state

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def check_model(model: nn.Module, qat: bool = False) -> None:
    """Raise ModelError for a model fxquant already prepared/converted, one with pruning/weight_norm hooks
    (which ``copy.deepcopy`` cannot copy), or, for QAT, one with parametrized weights."""
    state = get_state(model)
    quantized = next((n for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, FrozenQuantizer))),
                     None)
    if state is not None or quantized is not None:
        stage = state.stage if state is not None else f"quantized (it holds `{quantized}`)"
        raise ModelError(f"this model is already {stage} by fxquant; prepare() takes the original float model "
                         "(preparing again would quantize twice: double Q/DQ, weights as float Div/Round ops)")
    for name, m in model.named_modules():
        hooks = {type(h).__module__ + "." + type(h).__name__ for h in m._forward_pre_hooks.values()}
        where = f"`{name}` ({type(m).__name__})" if name else f"the root module ({type(m).__name__})"
        if any(h.startswith("torch.nn.utils.prune.") for h in hooks):
            raise ModelError(f"{where} is pruned with torch.nn.utils.prune (a *_orig parameter, a *_mask buffer and "
                             "a forward pre-hook); make the pruning permanent first: "
                             "torch.nn.utils.prune.remove(module, 'weight') for each pruned module")
        if "torch.nn.utils.weight_norm.WeightNorm" in hooks:
            raise ModelError(f"{where} uses the legacy torch.nn.utils.weight_norm (a forward pre-hook); fold it into "
                             "the weight first: torch.nn.utils.remove_weight_norm(module), or use "
                             "torch.nn.utils.parametrizations.weight_norm, which prepare() freezes by itself")
        if qat and parametrize.is_parametrized(m):  # QAT would train the underlying parameters
            raise ModelError(f"`{name}` has parametrized {', '.join(m.parametrizations.keys())} (e.g. weight_norm); "
                             "quantization-aware training quantizes plain weights: call torch.nn.utils.parametrize."
                             "remove_parametrizations(module, 'weight', leave_parametrized=True) first")


def freeze_parametrizations(work: nn.Module) -> list[str]:
    """Replace each parametrized tensor (``parametrizations.weight_norm``, ``spectral_norm``, ...) of ``work``
    (prepare's own copy) by its current value, as PTQ quantizes the weight the model computes with; returns
    the names (QAT models are refused by ``check_model``)."""
    frozen = []
    for name, m in list(work.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        tensors = list(m.parametrizations.keys())
        _freeze(m, tensors)
        frozen += [f"{name}.{t}" if name else t for t in tensors]
    return frozen


def _freeze(module: nn.Module, tensors: list[str]) -> None:
    # parametrize.remove_parametrizations deletes the property from the Parametrized* class, which the copy
    # shares with the user's model (deepcopy does not copy classes): swap this module's class back instead.
    values = {t: getattr(module, t).detach().clone() for t in tensors}
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    for tensor, value in values.items():
        module.register_parameter(tensor, nn.Parameter(value, requires_grad=value.is_floating_point()))


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in _HOOKS)


def warn_dropped_hooks(model: nn.Module, prepared: nn.Module, folded_bn: list[str]) -> list[str]:
    """Warn about hooks on the user's modules that do not run in ``prepared`` (folded BatchNorms, modules torch.fx
    traced through); returns their names."""
    hooked = [name for name, m in model.named_modules() if _has_hooks(m)]
    if not hooked:
        return []
    modules = dict(prepared.named_modules())
    graphs = [name for name, m in modules.items() if isinstance(m, fx.GraphModule)]
    dropped = []
    for name in hooked:
        inside = any(not g or name == g or name.startswith(g + ".") for g in graphs)
        if name in modules and _has_hooks(modules[name]) and (not inside or _called(prepared, graphs, name)):
            continue
        dropped.append(name)
    if dropped:
        why = ", ".join(f"`{n or '<root>'}`" + (" (BatchNorm folded into its conv)" if n in folded_bn else "")
                        for n in dropped)
        warnings.warn(f"hooks registered on {why} do not run in the prepared model: BatchNorm folding removes the "
                      "BatchNorm and torch.fx inlines the modules it traces through. Register the hooks on the "
                      "prepared model, or keep the module whole with QuantConfig(leaf_modules=(...,)) (and "
                      "fold_bn=False for a BatchNorm)", stacklevel=4)
    return dropped


def _called(prepared: nn.Module, graphs: list[str], name: str) -> bool:
    for g in graphs:
        gm = prepared.get_submodule(g)
        prefix = f"{g}." if g else ""
        if any(n.op == "call_module" and prefix + n.target == name for n in gm.graph.nodes):
            return True
    return False
