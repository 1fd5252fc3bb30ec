"""Trials whose worker is gone: found by heartbeat (databases) or by pid (journal, sqlite), ended, and retried."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from cnnexp.processes import is_dead
from cnnexp.tracking import tags
from cnnexp.tracking.owners import ownership
from cnnexp.tracking.runs import end_child_run
from cnnexp.tuning.optuna_private import hand_over_user_attrs, record_heartbeat
from cnnexp.tuning.space import optuna_params, params_of

# Heartbeats (RDB storages): a live worker beats every 10 s; a trial silent for 30 s is failed and retried.
# 30 s is three missed beats, so a worker slowed by a busy machine or a slow database round trip is not
# failed by mistake, while a dead worker's trial is retried within about half a minute (plus the next
# check, which happens whenever any worker starts a trial or waits for the study to finish).
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
MAX_RETRY = 2  # a trial that kills its worker three times is not tried again


class Heartbeat:
    """Beats for the cohort's running trials on storages with heartbeats (what study.optimize does per
    trial, which ask-and-tell leaves to the caller)."""

    def __init__(self, study: optuna.Study, trials: Callable[[], list[optuna.Trial]]):
        self.study, self.trials = study, trials  # asked at every beat: a cohort's trials change as it refills
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a cohort changing under us, a finished trial, a database hiccup
                for trial in self.trials():
                    record_heartbeat(self.study, trial)
            if self.stop.wait(HEARTBEAT_INTERVAL_S):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def queue_retry(study: optuna.Study, number: int, params: dict, run_id: str) -> None:
    """The trial's params (as cnnexp reads them: batch_size) queued again (WAITING), naming the trial and
    run it retries (see retry_tags)."""
    study.enqueue_trial(optuna_params(study, params), user_attrs={tags.RETRY_OF: number, tags.RETRY_OF_RUN_ID: run_id})


def retry_tags(trial: optuna.Trial) -> dict[str, str]:
    """A retried trial's run names the trial and run it retries (recorded when it was queued again)."""
    attrs = trial.user_attrs
    if tags.RETRY_OF not in attrs:
        return {}
    return {tags.RETRY_OF: str(attrs[tags.RETRY_OF]), tags.RETRY_OF_RUN_ID: str(attrs.get(tags.RETRY_OF_RUN_ID, ""))}


def end_trial_run(trial: FrozenTrial, reason: str) -> None:
    """The MLflow run of a trial whose worker is gone ends FAILED, with the reason as its error tag."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        end_child_run(run_id, "FAILED", {tags.ERROR: reason})


class FailStaleRunAndRetry:
    """Heartbeat-stale trial (Optuna has just set it FAIL): its run ends FAILED, its params are queued again."""

    def __init__(self):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        end_trial_run(trial, f"its worker sent no heartbeat for {GRACE_PERIOD_S} s (process or machine gone)")
        # The retry copies the user attrs: not the dead worker's run and owner, which the retry replaces.
        hand_over_user_attrs(trial, **{tags.RETRY_OF: trial.number,
                                       tags.RETRY_OF_RUN_ID: trial.user_attrs.get("mlflow_run_id", ""),
                                       "mlflow_run_id": None, "worker": None})
        self.retry(study, trial)


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials whose worker process on this host is gone: FAILED in both stores, params queued again.

    What heartbeats do for a database, for storages without them (the journal file, sqlite): only this
    host's trials, since another machine's cannot be checked from here.
    """
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if is_dead(t.user_attrs.get("worker", {}))]
    for trial in dead:
        end_trial_run(trial, "its worker process died")
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        queue_retry(study, trial.number, params_of(trial), trial.user_attrs.get("mlflow_run_id", ""))
    return [t.number for t in dead]


def end_dead_parent(study: optuna.Study) -> str | None:
    """The parent run of the study's last `tune` call, if its process died (a SIGKILL) and left it RUNNING:
    ended FAILED with the reason, as its dead trials are. Returns its run id, or None.

    A parent waiting for workers is left alone: its process has ended on purpose.
    """
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    try:
        run = MlflowClient().get_run(run_id) if run_id else None
    except MlflowException:  # another tracking store's run: not ours to end
        return None
    if (run is None or run.info.status != "RUNNING" or run.data.tags.get(tags.STUDY_STATUS) == tags.STUDY_WAITING
            or ownership(run).state != "dead"):
        return None
    end_child_run(run_id, "FAILED", {tags.ERROR: "its process died before the tune call ended"})
    return run_id
