"""benchmarks/trt_check.py: on a machine with a GPU and tensorrt it reports INT8 layers; elsewhere it says why not
and exits 0."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_trt_check_runs_or_says_why_not():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "trt_check.py")], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT check skipped: the tensorrt Python package is not installed" in run.stdout
    else:
        assert "skipped" in run.stdout or "convolutions running INT8" in run.stdout, run.stdout
