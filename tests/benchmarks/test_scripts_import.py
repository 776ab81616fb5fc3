"""Every benchmark script imports against the current package (a renamed helper breaks a script silently
otherwise: nothing else runs them in CI) and documents its command."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.smoke
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/NAME.py` runs: its folder first
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an optional package of the bench extra (weights, photos) is absent
        if (exc.name or "").partition(".")[0] in ("fxquant", "benchmarks", *SCRIPTS):
            raise
        pytest.skip(f"benchmarks/{name}.py needs {exc.name}")
    if hasattr(module, "main"):
        assert callable(module.main)
        assert module.__doc__ and "python benchmarks/" in module.__doc__, f"{name}: no command in its docstring"
