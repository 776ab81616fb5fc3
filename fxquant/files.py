"""The files fxquant writes (ONNX models, encodings, reports): paths checked before the work, each file written
whole or not at all, with the permissions the user's umask gives a new file (an existing file keeps its mode),
and through a symlink to the file it points to (the link stays a link)."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator

from fxquant.errors import FxQuantError


def output_path(path: object, what: str, error: type[FxQuantError]) -> str:
    """``path`` as a str, checked before any work is done: raises ``error`` for a path that is not a file name or
    names a directory (or sits below something that is not a directory)."""
    if not isinstance(path, (bytes, str, os.PathLike)):
        raise error(f"the {what} path must be a str, bytes or os.PathLike file name, got {type(path).__name__}")
    path = os.fsdecode(path)
    if not path or os.path.isdir(path):
        raise error(f"the {what} path {path!r} is a directory, not a file name: pass a file name (e.g. "
                    f"{os.path.join(path or '.', 'model.onnx' if what == 'ONNX' else 'out')!r})")
    folder = os.path.dirname(os.path.realpath(path))
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder) if os.path.dirname(folder) != folder else ""
    if folder and not os.path.isdir(folder):
        raise error(f"the {what} path {path!r} lies below {folder!r}, which is a file, not a folder: pass a path "
                    "in a folder")
    return path


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """A temporary file beside ``path``'s target for the caller to write; when the block succeeds it replaces the
    target (an existing file keeps its permission bits, a new one gets 0666 less the umask, as ``open`` gives);
    when it fails it is deleted and the target is untouched. A symlink ``path`` stays: its target is replaced."""
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".fxquant-{uuid.uuid4().hex}-{os.path.basename(target)}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for open()
    try:
        if os.path.exists(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
