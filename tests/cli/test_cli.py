"""The command line as a user runs it: quantize (ImageFolder data), report (.npy data), one-line errors with exit
code 2. Commands run through ``fxquant.cli.main`` in this process (what ``python -m fxquant`` calls;
``tests/cli/test_demo_extra.py`` runs that entry point in a fresh interpreter), so the suite does not pay an
interpreter start per command."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import textwrap

import numpy as np
import onnx
import pytest

from fxquant import BACKENDS
from fxquant.cli.main import main
from fxquant.lower.onnx_export import DEFAULT_OPSET
from fxquant.spec import CALIB_METHODS, CPU_TARGETS

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def not_a_model():
        return 3
""")


def fxquant(*args: str) -> subprocess.CompletedProcess:
    """``fxquant *args``: its exit code, stdout and stderr (argparse's own exits included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["fxquant", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(FACTORY)
    return path


def test_quantize_from_an_image_folder(factory, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    out = tmp_path / "tiny.onnx"
    run = fxquant("quantize", f"{factory}:build", "--backend", "onnxruntime", "--calib", str(tmp_path / "images"),
                  "--image-size", "16", "--batch-size", "2", "--num-batches", "2", "--target", "vnni",
                  "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "fxquant calibrate" in run.stderr  # progress bars
    summary = dict(re.findall(r"^(calibration|ops quantized / float|ONNX Runtime vs fake-quant)\s{2,}(.+)$",
                              run.stdout, re.M))
    assert summary["calibration"].endswith("2 batch(es), 4 sample(s) of shape (3, 16, 16)"), run.stdout
    assert summary["ops quantized / float"].endswith("/ 0"), run.stdout
    agreement = summary["ONNX Runtime vs fake-quant"]  # bit for bit where ORT's kernels compute as torch did
    assert agreement.startswith("identical outputs") or float(agreement.split()[0]) >= 30.0, agreement
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fxquant.backend"] == "onnxruntime" and meta["fxquant.calib_method"] == \
        BACKENDS["onnxruntime"].activation.calib_method
    assert meta["fxquant.target"] == "vnni"  # --target: the deployment CPU, recorded
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 4


@pytest.mark.zoo  # times the model in ORT layer by layer (tests/analysis/test_tune.py covers tune)
def test_quantize_tune_floats_what_is_slower(factory, tmp_path):
    out = tmp_path / "tuned.onnx"
    run = fxquant("quantize", f"{factory}:build", "--backend", "onnxruntime", "--calib", "random", "--input-shape",
                  "3,16,16", "--batch-size", "1", "--num-batches", "2", "--tune", "--out", str(out))
    assert run.returncode == 0, run.stderr
    tuned = re.search(r"^tune\s{2,}(\d+) of (\d+) weighted layers stay int8", run.stdout, re.M)
    assert tuned is not None, run.stdout
    kept, units = map(int, tuned.groups())
    assert units == 3
    model = onnx.load(out)
    weights = [n for n in model.graph.node if n.name.endswith("weight_quantizer/DequantizeLinear")]
    integer = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(weights) + len(integer) == kept  # each layer kept int8 reads int8 weights, the rest float ones
    summary = dict(re.findall(r"^(ops quantized / float)\s{2,}(.+)$", run.stdout, re.M))
    assert int(summary["ops quantized / float"].split(" / ")[1].split()[0]) >= units - kept


def test_report_writes_html_and_png(factory, tmp_path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32))
    html, png = tmp_path / "report.html", tmp_path / "plot.png"
    run = fxquant("report", f"{factory}:build", "--calib", str(data), "--batch-size", "4", "--out", str(html),
                  "--png", str(png), "--top", "3")
    assert run.returncode == 0, run.stderr
    ranked = re.findall(r"^\s+(\d)\s+(\S+)\s+(conv|linear)\s+([\d.]+)", run.stdout, re.M)
    assert [r[0] for r in ranked] == ["1", "2", "3"], run.stdout
    assert [float(r[3]) for r in ranked] == sorted(float(r[3]) for r in ranked)
    assert "most harmful" in run.stdout and "fxquant sensitivity" in run.stderr
    text = html.read_text()
    assert "data:image/png;base64," in text and text.count("<tr><td>") == 3  # tensorrt: conv, conv, linear
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("args", "message"), [
    (["quantize", "resnet1", "--calib", "random"], "unknown model 'resnet1': did you mean resnet18"),
    (["quantize", "resnet18", "--num-batches", "0"], "argument --num-batches: expected a positive integer, got 0"),
    (["quantize", "{factory}:missing", "--calib", "random"], "has no function 'missing'; it defines: build"),
    (["report", "{factory}:not_a_model", "--calib", "random"], "returned a int, not an nn.Module"),
    (["quantize", "{factory}:build", "--calib", "{bad}"], "expected samples along axis 0"),
    (["quantize", "{factory}:build", "--calib", "random", "--input-shape", "3,16,16", "--tune"],
     "tune measures ONNX Runtime's fused int8 kernels; the 'tensorrt' backend's graph targets another runtime"),
])
def test_errors_are_one_line_with_exit_code_2(factory, tmp_path, args, message):
    bad = tmp_path / "flat.npy"
    np.save(bad, np.zeros(5, np.float32))
    run = fxquant(*(a.format(factory=factory, bad=bad) for a in args))
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("fxquant ") and message in lines[0], lines[0]


def test_quantize_help_offers_every_backend_calib_method_and_the_export_opset():
    run = fxquant("quantize", "--help")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    backends = re.search(r"--backend \{([^}]*)\}", text).group(1).split(",")
    assert backends == list(BACKENDS) and "onnxruntime_dynamic" in backends
    assert re.search(r"--calib-method \{([^}]*)\}", text).group(1).split(",") == list(CALIB_METHODS)
    assert f"default: {DEFAULT_OPSET})" in text
    assert re.search(r"--target \{([^}]*)\}", text).group(1).split(",") == list(CPU_TARGETS)
