"""scikit-learn is the optional extra ``fxquant[demo]``: without it every module but the demo's imports, and
``fxquant demo`` says in one line what to install (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fxquant

NO_SKLEARN = "import sys; sys.modules['sklearn'] = None\n"  # any import of sklearn now fails as if not installed


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_SKLEARN + code], capture_output=True, text=True, timeout=300,
                          cwd=Path(fxquant.__file__).parents[1])


def test_the_package_imports_without_scikit_learn():
    out = _run("import importlib, pkgutil, fxquant\n"
               "names = [m.name for m in pkgutil.walk_packages(fxquant.__path__, 'fxquant.')]\n"
               "for name in names:\n"
               "    if name not in ('fxquant.cli.demo', 'fxquant.cli.demo_model', 'fxquant.__main__'):\n"
               "        importlib.import_module(name)\n"
               "print(len(names))\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) >= 40  # every module was walked, not an empty package


def test_demo_without_scikit_learn_says_what_to_install():
    out = _run("from fxquant.cli.main import main; sys.exit(main(['demo']))")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ['fxquant demo: error: the demo needs scikit-learn (its digits data): '
                                       'pip install "fxquant[demo]"']
