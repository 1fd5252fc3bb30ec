"""Continuing an interrupted train run: which runs may be resumed, and their checkpoints in the run's artifacts."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.checks import ConfigError
from cnnexp.tracking import tags
from cnnexp.tracking.owners import ownership
from cnnexp.tracking.runs import metric_by_step
from cnnexp.tracking.store import tracking_uri

RESUMABLE = ("KILLED", "FAILED")
CHECKPOINT_ARTIFACTS = "checkpoint"


def resumable_run(run_id: str, store_lost: bool = False, take_over: bool = False) -> Run:
    """The train run `resume` names, or ConfigError saying why it cannot be continued.

    A RUNNING run is continued when its process is gone: on this host by its pid; on another host, by a
    stale heartbeat and take_over (the user's word that it is gone); or when this machine lost its server
    (store_lost), which could then not be told that the run stopped.
    """
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ConfigError("resume", f"no run {run_id!r} in {tracking_uri()}") from None
    found = run.data.tags
    if "train" not in (found.get(tags.ENTRY_POINT), found.get(tags.PROJECT_ENTRY_POINT)):
        raise ConfigError("resume", f"run {run_id} is not a train run")
    if run.info.status == "RUNNING" and not store_lost:
        check_taken_over(run, take_over)
    elif run.info.status not in RESUMABLE + ("RUNNING",):
        raise ConfigError(
            "resume", f"run {run_id} is {run.info.status}; only KILLED or FAILED train runs can be resumed"
        )
    return run


def check_taken_over(run: Run, take_over: bool) -> None:
    """Refuses to continue a RUNNING run unless its process is known to be gone."""
    owned = ownership(run)
    if owned.state == "dead" or (owned.state == "stale" and take_over):
        return
    reasons = {
        "alive": "its process is still running here; stop it first (Ctrl-C ends it KILLED)",
        "recent": "its process on another host has sent a heartbeat lately; if it is gone, wait until its heartbeat "
                  "is stale and resume with take_over=true",
        "stale": "its process on another host has gone silent; if it is gone, resume with take_over=true",
        "unknown": "it records no owner; end it with `cnnexp orphans --end true` only if you know it is gone",
    }
    raise ConfigError("resume", f"run {run.info.run_id} is RUNNING ({owned.describe()}): {reasons[owned.state]}")


def fetch_checkpoint(run_id: str, into: Path) -> bool:
    """Downloads the checkpoint a run logged when it stopped (for resuming on another machine)."""
    if not any(a.path == CHECKPOINT_ARTIFACTS for a in MlflowClient().list_artifacts(run_id)):
        return False
    with tempfile.TemporaryDirectory(prefix="cnnexp-ckpt-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACTS, dst_path=tmp)
        shutil.copytree(local, into, dirs_exist_ok=True)
    return True


def log_checkpoint(directory: Path) -> None:
    if directory.is_dir():
        mlflow.log_artifacts(str(directory), CHECKPOINT_ARTIFACTS)


def link_resumed_run(run_id: str, epoch: int) -> None:
    """Under `mlflow run -P resume=X` MLflow has made a new run; it stays as a short record pointing to X."""
    client = MlflowClient()
    client.set_tag(run_id, tags.RESUMED_FROM_EPOCH, str(epoch))
    pending = os.environ.get("MLFLOW_RUN_ID")
    if pending and pending != run_id:
        resumed = client.get_run(run_id).info.run_name
        client.set_tag(pending, tags.RESUMED_INTO, run_id)
        client.set_tag(pending, tags.RUN_NAME, f"resume-of-{resumed}")
        client.set_tag(pending, tags.NOTE, f"Continued run {run_id} ({resumed}); its metrics and model are there.")


def logged_steps(run_id: str, metric: str) -> set[int]:
    return set(metric_by_step(run_id, metric))


def clear_stale_error(run_id: str) -> None:
    """A resumed run that has now finished did not fail: the error tag its earlier stop left (a full disk, a
    lost server) would say it did, in the runs table and to `compare`."""
    client = MlflowClient()
    if tags.ERROR in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, tags.ERROR)
