"""Command-line misuse (issue 13 section 2): failing user code is one line with exit code 2, files are imported
once, integer .npy data stays integer, --exclude globs that match nothing are named."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import onnx
import pytest

from fxquant.cli.main import build_parser, main

USER_FILE = textwrap.dedent("""
    import pathlib
    import torch
    from torch import nn

    with open(pathlib.Path(__file__).with_suffix(".imports"), "a") as f:  # counts the imports of this file
        f.write("x")

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    def broken_model():
        raise RuntimeError("factory exploded")

    def broken_data():
        raise KeyError("no such split")

    def data():
        torch.manual_seed(1)
        return torch.randn(8, 3, 8, 8)

    def mixed_shapes():
        return [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 9, 9)]

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.embed(ids))

    def tokens():
        torch.manual_seed(0)
        return Tokens().eval()

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.cls, self.box = nn.Linear(4 * 6 * 6, 5), nn.Linear(4 * 6 * 6, 4)

        def forward(self, x):
            h = torch.relu(self.conv(x)).flatten(1)
            return self.cls(h), self.box(h)

    def two_heads():
        torch.manual_seed(0)
        return TwoHeads().eval()
""")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(USER_FILE)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("spec", "calib", "message"), [
    ("broken_model", "random", r"the model factory function .*user.py:broken_model failed: RuntimeError: factory "
                               r"exploded"),
    ("model", "{file}:broken_data", r"the calibration function .*user.py:broken_data failed: KeyError: 'no such "
                                    r"split'"),
    ("model", "{file}:mixed_shapes", r"the model failed on calibration batch 1 \(float32\[2, 3, 9, 9\]\) \(prepare's "
                                     r"example was float32\[2, 3, 8, 8\]\)"),
])
def test_failing_user_code_is_one_line_and_exit_2(user_file, tmp_path, capsys, spec, calib, message):
    code = main(["quantize", f"{user_file}:{spec}", "--calib", calib.format(file=user_file), "--input-shape",
                 "3,8,8", "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert re.search(message, _error_line(capsys))
    assert not (tmp_path / "m.onnx").exists()


def test_an_exclude_glob_that_matches_nothing_is_named(user_file, tmp_path, capsys):
    code = main(["quantize", f"{user_file}:model", "--calib", f"{user_file}:data", "--exclude", "3.*",
                 "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert re.search(r"Override glob\(s\) '3\.\*' \(did you mean 3", _error_line(capsys))


def test_the_file_is_imported_once_for_model_and_data(user_file, tmp_path, capsys):
    code = main(["quantize", f"{user_file}:model", "--calib", f"{user_file}:data", "--out",
                 str(tmp_path / "m.onnx")])
    assert code == 0, capsys.readouterr().err
    assert user_file.with_suffix(".imports").read_text() == "x"


@pytest.mark.smoke
def test_integer_token_ids_stay_integer(user_file, tmp_path, capsys):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 10, size=(16, 5)))
    out = tmp_path / "tokens.onnx"
    code = main(["quantize", f"{user_file}:tokens", "--calib", str(ids), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    proto = onnx.load(out)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    # ORT's integer kernels may give the fake-quant model's outputs exactly (VNNI/AMX) or within float rounding
    found = re.search(r"ONNX Runtime vs fake-quant\s+(identical outputs \(bit for bit\)|([\d.]+) dB SQNR)",
                      capsys.readouterr().out)
    assert found is not None and (found.group(2) is None or float(found.group(2)) > 40)


def test_help_says_file_specs_are_executed():
    parser = build_parser()
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    assert "the file is executed as Python code, once" in " ".join(quantize.format_help().split())
    assert "executes that file" in " ".join(parser.format_help().split())


def test_a_model_returning_a_tuple_exports_and_exits_0(user_file, tmp_path, capsys):
    # before: the export succeeded, then the summary's SQNR took the tuple and the command exited 2
    out = tmp_path / "two.onnx"
    code = main(["quantize", f"{user_file}:two_heads", "--calib", f"{user_file}:data", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert len(onnx.load(out).graph.output) == 2
    found = re.search(r"fake-quant vs fp32\s+([\d.]+) dB SQNR", capsys.readouterr().out)
    assert found is not None and float(found.group(1)) > 25  # the worse of the two heads


def test_report_top_must_be_positive(user_file, tmp_path, capsys):
    # before: --top -3 printed an empty table
    code = main(["report", f"{user_file}:model", "--calib", f"{user_file}:data", "--top", "-3", "--out",
                 str(tmp_path / "r.html")])
    assert code == 2
    assert "--top must be at least 1 (the number of layers to list), got -3" in _error_line(capsys)
    assert not (tmp_path / "r.html").exists()


def test_an_opset_the_model_cannot_take_fails_before_calibration(user_file, tmp_path, capsys):
    # before: --opset help said ">= 13"; 13 failed after calibration with ONNX's adapter text, naming 18 while 14 works
    code = main(["quantize", f"{user_file}:model", "--calib", f"{user_file}:data", "--opset", "13", "--out",
                 str(tmp_path / "m.onnx")])
    assert code == 2
    captured = capsys.readouterr()
    assert re.search(r"opset 13 cannot be written for this model: ONNX's version converter cannot write its Relu "
                     r"\(as of opset 14\) at opset 13\. The lowest opset it can be written at is 14", captured.err)
    assert "fxquant calibrate" not in captured.err  # no calibration ran
    assert main(["quantize", f"{user_file}:model", "--calib", f"{user_file}:data", "--opset", "14", "--out",
                 str(tmp_path / "m.onnx")]) == 0
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["quantize"].format_help().split())
    assert "14 for most CNNs, 17 with LayerNorm), checked before calibration" in help_text


def test_a_directory_out_path_fails_before_calibration(user_file, tmp_path, capsys):
    code = main(["quantize", f"{user_file}:model", "--calib", f"{user_file}:data", "--out", str(tmp_path)])
    assert code == 2
    captured = capsys.readouterr()
    assert "is a directory, not a file name" in captured.err and "fxquant calibrate" not in captured.err
