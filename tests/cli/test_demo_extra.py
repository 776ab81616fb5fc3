"""scikit-learn is the optional extra ``fxquant[demo]``: without it every module but the demo's imports, and
``fxquant demo`` says in one line what to install (exit code 2). One interpreter, started with scikit-learn
blocked, checks both, and runs ``python -m fxquant --help`` (the package's entry point) there too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fxquant

NO_SKLEARN = "import sys; sys.modules['sklearn'] = None\n"  # any import of sklearn now fails as if not installed
SCRIPT = NO_SKLEARN + """
import contextlib, importlib, io, json, pkgutil, fxquant
names = [m.name for m in pkgutil.walk_packages(fxquant.__path__, 'fxquant.')]
for name in names:
    if name not in ('fxquant.cli.demo', 'fxquant.cli.demo_model', 'fxquant.__main__'):
        importlib.import_module(name)
from fxquant.cli.main import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(['demo'])
import runpy
out = io.StringIO()
sys.argv = ['fxquant', '--help']
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module('fxquant', run_name='__main__')
    except SystemExit as exc:
        help_code = exc.code
print(json.dumps({'modules': len(names), 'demo_code': code, 'demo_stderr': err.getvalue(),
                  'help_code': help_code, 'help': out.getvalue()}))
"""


@pytest.fixture(scope="module")
def without_sklearn() -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(fxquant.__file__).parents[1])
    assert run.returncode == 0, run.stderr[-3000:]  # an import failed
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_package_imports_without_scikit_learn(without_sklearn):
    assert without_sklearn["modules"] >= 40  # every module was walked, not an empty package


def test_demo_without_scikit_learn_says_what_to_install(without_sklearn):
    assert without_sklearn["demo_code"] == 2
    assert without_sklearn["demo_stderr"].splitlines() == [
        'fxquant demo: error: the demo needs scikit-learn (its digits data): pip install "fxquant[demo]"']


def test_python_m_fxquant_help_lists_every_command(without_sklearn):
    assert without_sklearn["help_code"] == 0
    assert all(cmd in without_sklearn["help"] for cmd in ("quantize", "report", "demo"))
