"""The package's import structure: no cycles (static, TYPE_CHECKING imports included), every module imports
alone, and imports sit at the top of files unless a comment says why one must be lazy."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

import fxquant

PACKAGE = Path(fxquant.__file__).parent
ROOT = PACKAGE.parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports outside functions and classes (inside if/try blocks too, TYPE_CHECKING ones included)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            stack += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                      *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return found


def _targets(node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
            if base in mods or f"{base}.{a.name}" in mods]


@pytest.mark.smoke
def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_node(name)
        for node in _module_level_imports(ast.parse(path.read_text())):
            graph.add_edges_from((name, t) for t in _targets(node, mods) if t != name)
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], f"import cycles: {cycles[:5]}"
    assert graph.number_of_edges() > 100  # the check sees the real import graph


@pytest.mark.zoo  # every module in turn, with the package unloaded before each: about 20 s on 2 cores
def test_every_module_imports_alone():
    names = sorted(m for m in _modules() if not m.endswith("__main__"))

    def script(chunk: list[str]) -> str:
        return ("import importlib, sys\n"
                "import torch, torchvision, onnx, onnxruntime, networkx  # third-party modules stay loaded\n"
                f"for name in {chunk!r}:\n"
                "    for loaded in [m for m in sys.modules if m == 'fxquant' or m.startswith('fxquant.')]:\n"
                "        del sys.modules[loaded]\n"
                "    importlib.import_module(name)\n"
                "print('ok')\n")

    # two interpreters, each importing every other module alone (the two cores of the CI machine)
    runs = [subprocess.Popen([sys.executable, "-c", script(names[i::2])], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0 and out.strip() == "ok", err[-3000:]


def test_imports_inside_functions_say_why():
    """A function-local import is allowed only with a ``# lazy:`` comment giving the reason (start-up time of
    the command line, an optional dependency)."""
    unexplained = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    context = " ".join(lines[max(inner.lineno - 2, 0):inner.end_lineno])
                    if "# lazy:" not in context:
                        unexplained.append(f"{name}:{inner.lineno}")
    assert unexplained == []


def test_every_fxquant_exception_derives_from_fxquant_error():
    errors = [v for v in vars(fxquant).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(errors) >= 8 and all(issubclass(e, fxquant.FxQuantError) for e in errors)


INTRO = ROOT / "docs" / "architecture_intro.md"


def _floors() -> list[tuple[str, list[str]]]:
    """The layer table of docs/architecture_intro.md, bottom first: (layer, the paths in its files column)."""
    rows = [line.split("|") for line in INTRO.read_text().splitlines() if line.startswith("| ")]
    rows = [(cells[1].strip(), re.findall(r"`([\w/]+(?:\.py|/))`", cells[2])) for cells in rows[1:]]
    return rows[::-1]


def _floor_of(module: str, floors: list[tuple[str, list[str]]]) -> int | None:
    """The index of the layer whose most specific path holds ``module`` (a package path holds what is below)."""
    rel = module.removeprefix("fxquant").removeprefix(".").replace(".", "/")
    best = None
    for index, (_, paths) in enumerate(floors):
        for path in paths:
            stem = path.removesuffix(".py").removesuffix("/").removesuffix("__init__").removesuffix("/")
            holds = rel == stem or (path.endswith("/") and rel.startswith(stem + "/"))
            if holds and (best is None or len(stem) > best[1]):
                best = (index, len(stem))
    return None if best is None else best[0]


def test_every_module_imports_only_its_layer_and_those_below():
    """docs/architecture_intro.md's table is the real floors: every module is in one layer, and no import (at
    module level, under TYPE_CHECKING, or inside a function) reaches a layer above its own."""
    floors, mods = _floors(), _modules()
    assert len(floors) >= 10 and floors[-1][0] == "command line"
    unplaced = [m for m in mods if _floor_of(m, floors) is None]
    assert unplaced == [], f"modules in no layer of {INTRO.name}: {unplaced}"
    upward = []
    for name, path in mods.items():
        own = _floor_of(name, floors)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, mods):
                    if _floor_of(target, floors) > own:
                        upward.append(f"{name} ({floors[own][0]}) imports {target} "
                                      f"({floors[_floor_of(target, floors)][0]})")
    assert upward == []
