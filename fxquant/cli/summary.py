"""Shared CLI helpers: stage timing, the closing summary table, warnings as one-line notes, config from args."""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Iterator

from fxquant.backends import get_backend
from fxquant.spec import Override, QuantConfig, QuantSpec


class Stopwatch:
    """Times named stages; ``summary()`` lists them."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        total = sum(self.stages.values())
        return f"{total:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in self.stages.items()) + ")"


@contextlib.contextmanager
def quiet_warnings() -> Iterator[list[str]]:
    """Collect warnings as one-line notes (printed under the summary) instead of multi-line tracebacks."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            for w in caught:
                if issubclass(w.category, (DeprecationWarning, FutureWarning)):
                    continue
                text = " ".join(str(w.message).split()) or w.category.__name__
                text = text if len(text) <= 240 else text[:237] + "..."
                if text not in notes:
                    notes.append(text)


def print_table(title: str, rows: list[tuple[str, str]], notes: list[str] | None = None) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 2 + max(len(v) for _, v in rows)))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for note in notes or []:
        print(f"note: {note}")


def config_from_args(args: argparse.Namespace) -> QuantConfig | None:
    """A QuantConfig for --exclude, --calib-method and --target (None when none is given)."""
    overrides = tuple(Override(glob, exclude=True) for glob in args.exclude)
    activation = None
    method = getattr(args, "calib_method", None)
    if method is not None:
        base: QuantSpec = get_backend(args.backend).activation
        activation = base.with_(calib_method=method)
    target = getattr(args, "target", None)
    if not overrides and activation is None and target is None:
        return None
    return QuantConfig(activation=activation, overrides=overrides, target=target)
