"""The scripts in examples/ run as a user runs them and print figures that hold (heavy: `-m zoo`).

custom_pattern.py and custom_backend.py run in tests/rules/test_rules_api.py (also zoo); mixed_precision_digits.py
runs its search through fxquant.mixed_precision, tested in tests/analysis/test_mixed_precision.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.zoo
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, cwd=cwd,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def figure(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in output:\n{text[-2000:]}"
    return float(found.group(1))


def test_quantize_torchvision_exports_resnet18_for_tensorrt(tmp_path):
    out = run("quantize_torchvision.py", "--model", "resnet18", "--backend", "tensorrt", "--out", "r18.onnx",
              cwd=tmp_path)
    assert (tmp_path / "r18.onnx").is_file()
    # TensorRT placement on resnet18: one Q/DQ per Conv/Gemm input and one per residual skip input, weights as DQ
    assert "'QuantizeLinear': 21" in out and "'DequantizeLinear': 42" in out
    assert figure(r"int8 vs fp32 SQNR: ([\d.]+) dB", out) >= 25.0
    assert figure(r"ORT agrees with torch at ([\d.]+) dB", out) >= 30.0


def test_qat_digits_recovers_w4a4_accuracy_in_torch_and_ort(tmp_path):
    out = run("qat_digits.py", "--out", "w4a4.onnx", cwd=tmp_path)
    fp32, ptq = figure(r"fp32: ([\d.]+)%", out), figure(r"W4A4 PTQ: ([\d.]+)%", out)
    qat, ort = figure(r"W4A4 QAT: ([\d.]+)%", out), figure(r"ONNX Runtime: ([\d.]+)%", out)
    assert fp32 >= 97.0
    assert qat >= max(ptq, fp32 - 1.5)
    assert ort >= qat - 1.0
