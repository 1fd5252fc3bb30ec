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
