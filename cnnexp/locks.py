"""Serialising processes around one path: concurrent prepares of a dataset, the creation of a store."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Serialises processes around one path (concurrent prepares of a dataset, creation of a store)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent prepares there are the user's to avoid
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (SQLAlchemy's form, MLflow's and Optuna's), else None."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?")[0])


@contextlib.contextmanager
def sqlite_creation_lock(url: str) -> Iterator[None]:
    """Serialises processes opening one sqlite database whose tables may still have to be made: concurrent
    migrations race and fail ("UNIQUE constraint failed: alembic_version.version_num", "table
    _alembic_tmp_... already exists"). Other URLs pass unlocked (a server database migrates in transactions)."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    with file_lock(path.with_name(f"{path.name}.lock")):
        yield
