"""Who runs a piece of work, and whether that process still exists: the one liveness check of the project."""
from __future__ import annotations

import os
import socket


def owner() -> dict[str, object]:
    """This process as a run or trial records its owner: the host, and the pid on it."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def alive(pid: int) -> bool:
    """Whether a process of this host exists (a zombie still counts; another user's process too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead(recorded: dict) -> bool:
    """The recorded owner is a process of this host that no longer exists. Another host's process, or a
    record without a pid, cannot be checked from here, so it is never called dead."""
    if recorded.get("host") != socket.gethostname() or "pid" not in recorded:
        return False
    return not alive(int(recorded["pid"]))
