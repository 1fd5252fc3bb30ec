"""Reading an exception a library raised: what it was raised from, and whether it says that a file could not
be written (a full disk), which torch hides under an error of its own."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from cnnexp.checks import first_line

READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)  # a directory this user cannot write at all


def error_chain(err: BaseException) -> list[BaseException]:
    """err and what it was raised from or while handling, as a traceback would show them."""
    found: list[BaseException] = []
    while err is not None and all(err is not seen for seen in found):
        found.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return found


def write_failure(err: BaseException) -> str | None:
    """Why a file could not be written, where that is what err says: an OSError's own words, found also
    under torch.save's RuntimeError ("[enforce fail at inline_container.cc:672] . unexpected pos ..."),
    which is all torch says of a full disk; None for any other error."""
    for found in error_chain(err):
        if isinstance(found, OSError):
            return found.strerror or str(found)
    if isinstance(err, RuntimeError) and ("inline_container.cc" in str(err) or "PytorchStreamWriter" in str(err)):
        return f"torch could not write the file: {first_line(err)}"
    return None


def unwritable_dir_advice(err: BaseException, directory: Path, param: str) -> str:
    """What to do about a directory a write failed in: a read-only one is chosen anew; on a full disk, space is
    freed (the disk and its free space named, as torch's own error names neither)."""
    if any(isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS for e in error_chain(err)):
        return f"choose a {param} you can write"
    return f"{disk_space(directory)}: free space there (or choose another {param})"


def disk_space(directory: Path) -> str:
    """'the disk at /mnt/x has 12 KB free' for the file system that holds directory (or its nearest parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return f"the disk at {mount}"
    return f"the disk at {mount} has {free // 1024:,} KB free"
