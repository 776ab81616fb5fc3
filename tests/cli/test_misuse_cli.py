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
