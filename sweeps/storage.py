"""Optuna storage from a URL: an RDB URL (SQLite, PostgreSQL, MySQL) or a journal file.

* ``sqlite:///optuna.db`` (the default): one machine, a few workers;
* ``postgresql://user:pass@host:5432/db`` (``pip install 'freezebench[postgres]'`` for the driver): workers
  on several machines;
* ``journal:///path/to/study.log`` or any path ending in ``.log`` / ``.journal``: an append-only file with
  file locks, for shared (NFS) file systems without a database server.
"""

from __future__ import annotations

import re
from typing import Any

from .space import SweepError

DEFAULT_STORAGE = "sqlite:///optuna.db"
_RDB = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


def redact(url: str) -> str:
    """The URL without its password (for logs and MLflow tags)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def journal_path(url: str) -> str | None:
    if url.startswith("journal://"):
        return url[len("journal://"):] or None
    if "://" not in url and url.endswith((".log", ".journal")):
        return url
    return None


def open_storage(url: str | None) -> Any:
    """Build the Optuna storage for ``url`` (default :data:`DEFAULT_STORAGE`); :class:`SweepError` if unusable."""
    import optuna

    url = url or DEFAULT_STORAGE
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        try:
            # the open lock (O_EXCL lock file) works on NFS, where symlink locks may not
            return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        except OSError as e:
            raise SweepError(f"cannot open journal storage {path!r}: {e}") from None
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in _RDB:
        raise SweepError(
            f"storage {redact(url)!r} is not a database URL or journal file: use sqlite:///optuna.db, "
            f"postgresql://user:pass@host/db, or journal:///path/study.log"
        )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(scheme))
    except ModuleNotFoundError as e:
        hint = " (pip install 'freezebench[postgres]')" if scheme.startswith("postgres") else ""
        raise SweepError(f"storage {redact(url)!r} needs the database driver {e.name!r}{hint}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(f"cannot open storage {redact(url)!r}: {first}") from None


def _engine_kwargs(scheme: str) -> dict[str, Any]:
    if scheme == "sqlite":
        # several worker processes on one file: wait for the write lock instead of failing at once
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}
