"""Files: atomic writes (a reader, or a crash, never sees a half-written checkpoint, predictor or dataset) and
the one reader of ``.pt`` files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def read_pt(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """Load a ``.pt`` file on the CPU with ``weights_only=True`` (tensors and plain types; no code runs).

    ``FileNotFoundError`` when ``path`` is not a file; whatever ``torch.load`` raises for an unreadable one
    (callers turn both into one line naming what the file was for). ``mmap``: memory-map the tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(str(p))
    return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` onto ``path``.

    On any failure the temporary file is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
