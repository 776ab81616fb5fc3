"""The files fxquant writes (issue 21 section 3): permissions as the umask gives them (an existing file keeps its
mode), symlinks written through to their target, and a directory or a path below a file refused before any work."""

from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

import fxquant
from fxquant.encodings import EncodingsError
from fxquant.errors import ExportError
from fxquant.files import atomic_write
from tests.models.tiny import ConvFC


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxquant.prepare(ConvFC().eval(), _x())
    return fxquant.calibrate(model, [_x()], progress=False)


@pytest.fixture(scope="module")
def qmodel(prepared):
    return fxquant.convert(prepared)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_files_get_the_umask_and_existing_ones_keep_their_mode(qmodel, prepared, tmp_path, umask_022):
    # before: every exported file was mode 0600 (a temporary file renamed), even replacing a 0644 file
    fxquant.export_onnx(qmodel, _x(), tmp_path / "new.onnx")
    fxquant.save_encodings(prepared, tmp_path / "new.json")
    assert _mode(tmp_path / "new.onnx") == _mode(tmp_path / "new.json") == 0o644
    for name, mode in (("shared.onnx", 0o664), ("private.onnx", 0o600)):
        (tmp_path / name).write_bytes(b"old")
        os.chmod(tmp_path / name, mode)
        fxquant.export_onnx(qmodel, _x(), tmp_path / name)
        assert _mode(tmp_path / name) == mode and (tmp_path / name).stat().st_size > 1000


def test_a_symlink_is_written_through_to_its_target(qmodel, prepared, tmp_path):
    # before: the link was replaced by a file, and its target kept the old model
    target, link = tmp_path / "models" / "v2.onnx", tmp_path / "current.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old model")
    link.symlink_to(target)
    result = fxquant.export_onnx(qmodel, _x(), link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.stat().st_size > 1000 and target.read_bytes() != b"old model"
    assert result.path == str(link) and sorted(os.listdir(target.parent)) == ["v2.onnx"]
    enc_target, enc_link = tmp_path / "enc.json", tmp_path / "enc_link.json"
    enc_target.write_text("{}")
    enc_link.symlink_to(enc_target)
    fxquant.save_encodings(prepared, enc_link)
    assert enc_link.is_symlink() and '"fxquant_version"' in enc_target.read_text()


def test_a_directory_is_refused_before_the_export_runs(qmodel, prepared, tmp_path, monkeypatch):
    # before: the whole export ran, then os.replace raised a raw IsADirectoryError
    def no_export(*args, **kwargs):
        raise AssertionError("the export ran before the path was checked")

    monkeypatch.setattr("fxquant.lower.onnx_export._export_checked", no_export)
    with pytest.raises(ExportError, match=r"the ONNX path '.*' is a directory, not a file name: pass a file name "
                                          r"\(e\.g\. '.*model\.onnx'\)"):
        fxquant.export_onnx(qmodel, _x(), tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match=r"lies below '.*afile', which is a file, not a folder"):
        fxquant.export_onnx(qmodel, _x(), tmp_path / "afile" / "m.onnx")
    with pytest.raises(EncodingsError, match=r"the encodings path '.*' is a directory, not a file name"):
        fxquant.save_encodings(prepared, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with pytest.raises(ZeroDivisionError), atomic_write(str(target)) as tmp:
        assert _mode(tmp) == 0o640  # the replacement gets the old file's mode before it is renamed
        with open(tmp, "wb") as f:
            f.write(b"partial")
        1 / 0  # noqa: B018
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]
