"""A run's life: started (or resumed), always ended with the status that happened; child runs of a study."""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Param, SourceType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.git_utils import get_git_commit, get_git_repo_url
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

from cnnexp.checks import ConfigError
from cnnexp.processes import owner
from cnnexp.tracking import store, store_errors, tags

PROJECT_DIR = Path(__file__).resolve().parents[2]
_runs_started = 0


@contextlib.contextmanager
def tracked_run(**kwargs) -> Iterator[mlflow.ActiveRun]:
    """Starts (or, under `mlflow run`, resumes) a run and always ends it with the status that happened.

    Inside another run (the main pipeline's steps) the new run is its child. Ending it never raises:
    when the store itself is what failed, the error that stopped the run is the one that matters.
    A new run is created with its owner (and the caller's tags, such as the entry point) in the same
    write, so a run that its process could not end (a full disk) is one `cnnexp orphans` finds.
    """
    global _runs_started
    kwargs.setdefault("nested", mlflow.active_run() is not None)
    new = "run_id" not in kwargs and not os.environ.get("MLFLOW_RUN_ID")  # a run resumed has its own source
    kwargs["tags"] = {**(source_tags() if new else {}), **owner_tags(), **kwargs.get("tags", {})}
    try:
        store.open_store()
    except OSError as err:  # its lock file: a read-only or full directory
        raise store_errors.unwritable_lock(err) from None
    with mlflow.start_run(**kwargs) as run:
        _runs_started += 1
        if not kwargs["nested"]:  # a nested run's experiment is its parent's, already marked
            mark_model_training(run.info.experiment_id)
        try:
            yield run
        except KeyboardInterrupt:
            _flush_quietly()  # metrics of completed epochs may still sit in the async queue
            _end_quietly("KILLED")
            raise
        except BaseException as err:
            if store.store_problem() is None:  # a server that is gone would only make each write wait out its retries
                _flush_quietly()
                with contextlib.suppress(Exception):
                    MlflowClient().set_tag(run.info.run_id, tags.ERROR, error_text(err))
            _end_quietly("FAILED")
            raise


def mark_model_training(experiment_id: str) -> None:
    """Tags the experiment as model training (tags.EXPERIMENT_KIND) unless it has a kind already."""
    client = MlflowClient()
    if tags.EXPERIMENT_KIND in client.get_experiment(experiment_id).tags:
        return
    # Best effort: a shared server may let this user log runs but not edit the experiment.
    with contextlib.suppress(MlflowException):
        client.set_experiment_tag(experiment_id, tags.EXPERIMENT_KIND, tags.MODEL_TRAINING)


def owner_tags() -> dict[str, str]:
    """This process as a run's owner (host, pid) and a first heartbeat (cnnexp.tracking.owners reads them)."""
    me = owner()
    return {tags.OWNER_HOST: me["host"], tags.OWNER_PID: str(me["pid"]), tags.HEARTBEAT: f"{time.time():.0f}"}


def runs_started() -> int:
    """How many runs this process has started (or resumed): whether an interruption ended one."""
    return _runs_started


@functools.cache
def source_tags() -> dict[str, str]:
    """The lineage tags `mlflow run` gives its runs (source name and type, git commit), for the runs
    `cnnexp` and tuning workers start themselves; without them a run cannot say which code made it."""
    found = {MLFLOW_SOURCE_NAME: get_git_repo_url(str(PROJECT_DIR)) or PROJECT_DIR.as_uri(),
             MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.PROJECT)}
    commit = get_git_commit(str(PROJECT_DIR))
    if commit is not None:  # an installed copy, outside any git checkout, has none
        found[MLFLOW_GIT_COMMIT] = commit
    return found


def _end_quietly(status: str) -> None:
    # mlflow.end_run leaves the run before it writes the status, so a failed write ends it locally all the same.
    with contextlib.suppress(Exception):
        mlflow.end_run(status)


def _flush_quietly() -> None:
    with contextlib.suppress(Exception):
        mlflow.flush_async_logging()


def error_text(err: BaseException) -> str:
    """The error as a run tag holds it (MLflow caps tag values; 5,000 characters keeps us under)."""
    return f"{type(err).__name__}: {err}"[:5000]


def end_pending_run(status: str, err: BaseException | None = None, run_id: str | None = None) -> None:
    """Ends the run `mlflow run` created for us if our code never got to end it (e.g. bad parameters)."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    with contextlib.suppress(Exception):  # the store itself may be what failed
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            if err is not None:
                client.set_tag(run_id, tags.ERROR, error_text(err))
            entry_point = run.data.tags.get(tags.PROJECT_ENTRY_POINT)
            if entry_point:  # our code never named it: the entry point, not MLflow's random name, says what it was
                client.set_tag(run_id, tags.RUN_NAME, entry_point)
            client.set_terminated(run_id, status)


def set_tags(values: dict[str, str], run_id: str | None = None) -> None:
    """Onto the active run, or onto another run by id."""
    if run_id is None:
        mlflow.set_tags(values)
        return
    client = MlflowClient()
    for key, value in values.items():
        client.set_tag(run_id, key, str(value)[:5000])


def run_tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def metric_by_step(run_id: str, metric: str, client: MlflowClient | None = None) -> dict[int, float]:
    """A metric's history by step: a resumed run may log an epoch its store missed again, from the checkpoint."""
    return {m.step: m.value for m in (client or MlflowClient()).get_metric_history(run_id, metric)}


CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def epoch_history(run_id: str) -> list[dict]:
    """A training run's (or trial's) learning curves as one dict per epoch, from its per-epoch metrics;
    empty for a run that logged none."""
    client = MlflowClient()
    curves = {name: metric_by_step(run_id, name, client) for name in CURVES}
    epochs = sorted(set.intersection(*(set(values) for values in curves.values())))
    return [{"epoch": epoch, **{name: curves[name][epoch] for name in CURVES}} for epoch in epochs]


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


RUN_ID_LENGTH = 32  # MLflow's run ids: 32 hex digits; the UI and our lines often show the first 8
SHOWN_MATCHES = 3


def full_run_id(param: str, given: str) -> str:
    """The run id a unique prefix (as `git` takes a commit's) stands for, in any experiment; given unchanged
    where it is a whole id or matches no run (the caller says there is no such run). Refuses an ambiguous one."""
    if len(given) >= RUN_ID_LENGTH or not given.isalnum():
        return given
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = [r.info.run_id for r in client.search_runs(experiments, f"attributes.run_id LIKE '{given.lower()}%'",
                                                       max_results=SHOWN_MATCHES + 1)] if experiments else []
    if len(found) > 1:
        shown = ", ".join(found[:SHOWN_MATCHES]) + (" and more" if len(found) > SHOWN_MATCHES else "")
        raise ConfigError(param, f"{given!r} is the start of several run ids ({shown}); give more of it")
    return found[0] if found else given


# MLflow 3.18's UI takes its GenAI / model-training view from this URL parameter (else the browser's last
# choice, GenAI at first) and no longer from the experiment's kind tag, which 3.17 read.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def run_address(run: mlflow.ActiveRun) -> str:
    """' at <its page in the UI, in the model-training view>' when the tracking URI is a server, else nothing."""
    uri = store.tracking_uri()
    if not store.is_server(uri):
        return ""
    page = f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{MODEL_TRAINING_VIEW}"
    return f" at {store.redact_url(uri.rstrip('/'))}{page}"


# --- child runs written with the client, so several processes can log under one parent ----------

def active_run_ids() -> tuple[str, str]:
    """(run id, experiment id) of the active run: what worker processes need to log children under it."""
    info = mlflow.active_run().info
    return info.run_id, info.experiment_id


def start_child_run(parent_run_id: str, experiment_id: str, run_name: str, params: dict, run_tags: dict) -> str:
    """A child run (a trial) created with its owner, the worker process, as tracked_run creates runs."""
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**source_tags(), **owner_tags(), MLFLOW_PARENT_RUN_ID: parent_run_id, **run_tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def end_child_run(run_id: str, status: str, run_tags: dict[str, str] | None = None) -> None:
    set_tags(run_tags or {}, run_id)
    MlflowClient().set_terminated(run_id, status)


def reopen(run_id: str) -> None:
    """Marks an ended run RUNNING again: a study's parent that workers on other machines will finish."""
    MlflowClient().update_run(run_id, status="RUNNING")
