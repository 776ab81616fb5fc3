"""Validation of a QuantConfig against the model: globs that match nothing, concrete_args the forward lacks."""

from __future__ import annotations

import difflib
import fnmatch
import inspect

from torch import fx, nn

from fxquant.errors import ConfigError
from fxquant.spec import QuantConfig


def _names(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules() if name]


def _matches(glob: str, names: list[tuple[str, str]]) -> bool:
    return any(fnmatch.fnmatchcase(n, glob) or fnmatch.fnmatchcase(c, glob) for n, c in names)


def _unmatched(field: str, globs: list[str], names: list[tuple[str, str]]) -> None:
    bad = [g for g in globs if not _matches(g, names)]
    if not bad:
        return
    pool = sorted({n for n, _ in names} | {c for _, c in names})
    hints = []
    for g in bad:
        close = difflib.get_close_matches(g.rstrip(".*"), pool, n=3)
        hints.append(f"{g!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ConfigError(f"{field} glob(s) {', '.join(hints)} match no module name or class of the model; a glob "
                      "matches the whole qualified name (e.g. 'layer4.*' or 'fc', not 'fc.*' for a module named "
                      "fc). Fix the glob or drop it")


def check_before_trace(model: nn.Module, config: QuantConfig) -> None:
    """Raise ConfigError for leaf_modules/non_traceable globs that match nothing and unknown concrete_args."""
    names = _names(model)
    for field in ("leaf_modules", "non_traceable"):
        _unmatched(f"QuantConfig.{field}", list(getattr(config, field, ())), names)
    if config.concrete_args:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return
        unknown = [k for k, _ in config.concrete_args if k not in params]
        if unknown:
            raise ConfigError(f"QuantConfig.concrete_args names {', '.join(map(repr, unknown))}, which "
                              f"{type(model).__name__}.forward does not take (its arguments: "
                              f"{', '.join(params) or 'none'}); use the forward's argument names")


def check_overrides(model: nn.Module, prepared: nn.Module, config: QuantConfig) -> None:
    """Raise ConfigError for Override patterns that match no module and no graph node of the prepared model."""
    names = _names(model) + [(n.name, n.name) for m in prepared.modules() if isinstance(m, fx.GraphModule)
                             for n in m.graph.nodes]
    _unmatched("Override", [o.pattern for o in config.overrides], names)
