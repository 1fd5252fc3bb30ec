"""Who runs a train run: its owner (host, pid) and heartbeat, and whether a RUNNING run's process is gone."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cnnexp.processes import is_dead
from cnnexp.tracking import tags
from cnnexp.tracking.runs import metric_by_step
from cnnexp.tracking.store import writes_queued

# A heartbeat is written at the start and after every epoch. Another host's run counts as stale once it is
# this much older than its longest epoch allows (3 epochs' time), and never sooner than STALE_AFTER_S.
STALE_AFTER_S = 120.0


def beat() -> None:
    """The active run's heartbeat (after an epoch), written as the epoch's metrics are (store.writes_queued)."""
    mlflow.set_tag(tags.HEARTBEAT, f"{time.time():.0f}", synchronous=not writes_queued())


@dataclass(frozen=True)
class Ownership:
    """What can be said of a RUNNING run's process from here."""

    state: str  # "alive" (this host, pid exists), "dead" (this host, pid gone), "stale", "recent", "unknown"
    host: str
    pid: int | None
    silent_s: float | None  # seconds since its last heartbeat

    def describe(self) -> str:
        if self.pid is None:
            return "no recorded owner"
        where = f"pid {self.pid} on {'this host' if self.host == socket.gethostname() else self.host}"
        heard = f", last heartbeat {self.silent_s:.0f} s ago" if self.silent_s is not None else ""
        return f"{where}{heard}"


def ownership(run: Run) -> Ownership:
    found = run.data.tags
    host, pid = found.get(tags.OWNER_HOST, ""), found.get(tags.OWNER_PID)
    beat_at = found.get(tags.HEARTBEAT)
    silent_s = time.time() - float(beat_at) if beat_at else None
    if not host or pid is None:
        return Ownership("unknown", host, None, silent_s)
    if host == socket.gethostname():
        return Ownership("dead" if is_dead({"host": host, "pid": int(pid)}) else "alive", host, int(pid), silent_s)
    stale = silent_s is not None and silent_s > max(STALE_AFTER_S, 3 * longest_epoch_s(run.info.run_id))
    return Ownership("stale" if stale else "recent", host, int(pid), silent_s)


def longest_epoch_s(run_id: str) -> float:
    return max(metric_by_step(run_id, "epoch_time_s").values(), default=0.0)


def is_train_run(run: Run) -> bool:
    return "train" in (run.data.tags.get(tags.ENTRY_POINT), run.data.tags.get(tags.PROJECT_ENTRY_POINT))


def orphaned_runs() -> list[tuple[Run, Ownership]]:
    """RUNNING runs of every experiment, started by cnnexp (they name an owner), whose process is gone: dead
    on this host; or, for a train run, another host's silent for longer than its epochs allow (those may
    still be alive; only their owner's host can tell). Other runs beat only once, at their start, so only
    their own host can tell. A study's parent waiting for workers elsewhere is not an orphan."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, filter_string=f"attributes.status = 'RUNNING' and tags.`{tags.OWNER_PID}` != ''")
    found = [(run, ownership(run)) for run in running
             if run.data.tags.get(tags.STUDY_STATUS) != tags.STUDY_WAITING]
    return [(run, owned) for run, owned in found
            if owned.state == "dead" or (owned.state == "stale" and is_train_run(run))]
