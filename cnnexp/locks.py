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


class LockHeld(RuntimeError):
    """Another process holds the lock that held_alone asked for."""


@contextlib.contextmanager
def held_alone(lock_path: Path) -> Iterator[None]:
    """Holds the lock for the block, or raises LockHeld at once when another process holds it. The system lets
    go of it when its holder dies, even by SIGKILL: no stale lock file ever refuses anyone."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks (see file_lock)
        yield
        return
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(str(lock_path)) from None
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
