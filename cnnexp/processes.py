"""Who runs a piece of work, and whether that process still exists: the one liveness check of the project."""
from __future__ import annotations

import os
import socket

import psutil


def owner() -> dict[str, object]:
    """This process as a run or trial records its owner: the host, and the pid on it."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def alive(pid: int) -> bool:
    """Whether a process of this host still runs (another user's too). A zombie does not: it has ended and only
    waits to be reaped, which after a SIGKILL of a whole process group can take a while."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def is_dead(recorded: dict) -> bool:
    """The recorded owner is a process of this host that no longer exists. Another host's process, or a
    record without a pid, cannot be checked from here, so it is never called dead."""
    if recorded.get("host") != socket.gethostname() or "pid" not in recorded:
        return False
    return not alive(int(recorded["pid"]))
