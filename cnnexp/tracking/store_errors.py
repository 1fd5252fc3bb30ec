"""A tracking store that cannot be written (its disk full, or read-only): one line naming MLFLOW_TRACKING_URI,
and the runs this process could not end, which `cnnexp orphans` then finds by their owner tags."""
from __future__ import annotations

import errno

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.checks import ConfigError
from cnnexp.errors import error_chain
from cnnexp.processes import owner
from cnnexp.tracking import store, tags

# How the stores say it (lowercased): sqlite through SQLAlchemy, PostgreSQL (psycopg's DiskFull), and a
# server relaying either in its HTTP error. Matched in the whole chain of a store call's exception.
FULL = ("database or disk is full", "no space left on device", "could not extend file", "disk quota exceeded")
READ_ONLY = ("attempt to write a readonly database", "read-only transaction", "read-only file system")
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SHOWN = 3  # runs named in the line (a study's trials may be many); orphans lists them all


def _from_the_store(chain: list[BaseException]) -> bool:
    """Raised by a store call (MLflow, SQLAlchemy, a database driver), not by our own file writes, which say
    which file they could not write (checkpoint_dir, data_dir) themselves."""
    return any(isinstance(e, MlflowException) or type(e).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "psycopg2")
               for e in chain)


def unwritable_store(err: BaseException) -> Exception | None:
    """One line for an error that means the store cannot be written, or None for any other error.

    A full disk is a failure while working (RuntimeError, exit 1: free space and go on); a read-only store is
    the setting's fault (ConfigError, exit 2: MLFLOW_TRACKING_URI names a store this user cannot write).
    """
    chain = error_chain(err)
    if not _from_the_store(chain):
        return None
    text = " ".join(str(e) for e in chain).lower()
    uri = store.redact_url(store.tracking_uri())
    if any(marker in text for marker in FULL):
        return RuntimeError(f"MLFLOW_TRACKING_URI: the tracking store {uri} cannot be written: its disk is full; "
                            f"free space there, then run again{left_running('once there is space')}")
    if any(marker in text for marker in READ_ONLY):
        return ConfigError("MLFLOW_TRACKING_URI", f"the tracking store {uri} is read-only; point MLFLOW_TRACKING_URI "
                                                  f"at a store you can write{left_running('once it can be written')}")
    return None


def unwritable_lock(err: OSError) -> Exception:
    """The same line when a sqlite store's lock file beside it cannot be made (a read-only or full directory)."""
    uri = store.redact_url(store.tracking_uri())
    if err.errno in FULL_ERRNOS:
        return RuntimeError(f"MLFLOW_TRACKING_URI: the tracking store {uri} cannot be written: its disk is full "
                            f"({err.strerror}: {err.filename}); free space there, then run again")
    return ConfigError("MLFLOW_TRACKING_URI", f"the tracking store {uri} is read-only ({err.strerror}: "
                                              f"{err.filename}); point MLFLOW_TRACKING_URI at a store you can write")


def left_running(when: str) -> str:
    """'; left RUNNING: <ids> (...)' for the runs this process owns that the store still has RUNNING."""
    me = owner()
    query = (f"attributes.status = 'RUNNING' and tags.`{tags.OWNER_HOST}` = '{me['host']}' "
             f"and tags.`{tags.OWNER_PID}` = '{me['pid']}'")
    try:  # reading still works on a full disk or a read-only file; a store that cannot even be read says nothing
        client = MlflowClient()
        experiments = [e.experiment_id for e in client.search_experiments()]
        ids = [r.info.run_id for r in client.search_runs(experiments, filter_string=query)]
    except Exception:  # noqa: BLE001 - the line about the store is what matters
        return ""
    if not ids:
        return ""
    named = ", ".join(ids[:SHOWN]) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")
    return f"; left RUNNING: run {named} ({when}, `cnnexp orphans --end true` ends it)"
