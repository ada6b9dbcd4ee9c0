"""Durable atomic writes and integrity-checked reads of ``torch.save`` files.

Writes (:func:`atomic_torch_save`): a reader, a crash or a power cut never sees a half-written checkpoint,
predictor or dataset. The object goes to a temporary file ``.<name>.<random>.tmp`` in the target's folder,
which is fsynced, renamed over the target (``os.replace``, atomic on POSIX) and then the folder is fsynced
so that the rename itself is on disk. Temporary files of the same target left by an earlier writer that
was killed mid-write (``SIGKILL`` leaves them: no ``finally`` runs) are removed first.

Reads (:func:`read_torch`): the one reader of every ``.pt`` file freezebench consumes (training
checkpoints, final weights, SmartFRZ predictors, predictor datasets, CKA-oracle references). ``torch.save``
writes a zip archive whose members carry CRC32 checksums, and ``torch.load`` does not check them: a flipped
byte inside a tensor's data loads silently as a wrong weight. So the archive is verified member by member
(:meth:`zipfile.ZipFile.testzip` reads every member and compares its CRC32) before anything is unpickled,
and every failure is one :class:`~freezebench.errors.FreezebenchError` line naming the file, never
PyTorch's own advice to retry with ``weights_only=False`` (which would execute arbitrary pickled code).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import FreezebenchError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder: the rename is then as durable as they allow
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.*.tmp`` files of target ``path`` (left by a writer killed mid-write); returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _atomic_write(path: str | os.PathLike, mode: str, write: Callable[[Any], None],
                  before_replace: Callable[[], None] | None = None) -> Path:
    """The durable write protocol: stale temporaries of ``path`` removed, ``write(file)`` into a temporary file
    in the same folder, fsync, ``os.replace`` onto ``path``, fsync the folder. On any failure the temporary file
    is removed and an existing file at ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            if before_replace is not None:
                before_replace()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike, *,
                      before_replace: Callable[[], None] | None = None) -> Path:
    """``torch.save`` through the durable write protocol (:func:`_atomic_write`).

    ``before_replace`` is called once the temporary file is written and before it is synced and renamed
    (the ``mid_checkpoint_write`` fault point, :mod:`freezebench.faults`).
    """
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f), before_replace)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file durably and atomically (same protocol as :func:`atomic_torch_save`)."""
    return _atomic_write(path, "w", lambda f: f.write(text))


def verify_zip(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` is a complete zip archive whose every member matches its CRC32, else the reason."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC32; the first bad member's name
    except zipfile.BadZipFile as e:
        return f"not a complete zip archive ({e}): truncated, or not written by torch.save"
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        return f"its zip archive is damaged ({type(e).__name__}: {str(e)[:120]})"
    except Exception as e:  # zlib.error and friends from a damaged compressed member
        return f"its zip archive is damaged ({type(e).__name__}: {str(e)[:120]})"
    if bad is not None:
        return f"member {bad!r} fails its CRC32 check: the bytes changed after the file was written"
    return None


def _short(e: BaseException) -> str:
    """An unpickling error in one line, without PyTorch's advice to load with ``weights_only=False``."""
    text = str(e).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return ("it holds objects other than tensors and plain containers, which the safe loader "
                "(weights_only) refuses")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def read_pt(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """:func:`read_torch` without the message: ``FileNotFoundError`` when ``path`` is not a file,
    ``ValueError`` (the reason) when it fails its integrity check, else what ``torch.load`` raises."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(str(p))
    problem = verify_zip(p)
    if problem is not None:
        raise ValueError(problem)
    return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)


def read_torch(path: str | os.PathLike, *, what: str, fix: str, error: type[FreezebenchError] = FreezebenchError,
               mmap: bool = False) -> Any:
    """Load a ``torch.save`` file after checking its integrity; ``error`` (one line) on any problem.

    ``what`` names the file in messages (``"checkpoint"``, ``"SmartFRZ predictor weights"``), ``fix`` says
    what to do about a damaged one. Always ``weights_only=True`` on the CPU; ``mmap``: memory-map tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist (or is not a file)")
    problem = verify_zip(p)
    if problem is None:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            problem = _short(e)
    raise error(f"{what} {str(p)!r} cannot be read ({problem}); {fix}")


def check_writable_folder(folder: str | os.PathLike, key: str) -> None:
    """Raise :class:`~freezebench.errors.ConfigError` unless ``folder`` exists as a writable folder or can be
    created (its nearest existing ancestor is a writable folder). Creates nothing: run before any training."""
    from .errors import ConfigError

    p = Path(folder).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(folder)!r} cannot be created: {str(probe)!r} is a file, not a folder; "
                          f"point {key} at a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == p else f"cannot be created ({str(probe)!r} is not writable)"
        raise ConfigError(f"{key}={str(folder)!r} {where}; point {key} at a folder you can write to")


def read_text_file(path: str | os.PathLike, *, what: str, error: type[FreezebenchError] = FreezebenchError) -> str:
    """A user-written text file (YAML spaces, suites) as text; ``error`` naming the file when it cannot be
    read, is not UTF-8 or holds NUL bytes (a damaged or binary file: such files carry no checksum)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise error(f"{what} {str(p)!r} cannot be read ({e.strerror or e})") from None
    if b"\x00" in data:
        raise error(f"{what} {str(p)!r} is damaged or not a text file (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(p)!r} is damaged or not a text file (not UTF-8 at byte {e.start})") from None
