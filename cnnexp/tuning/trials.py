"""Trials run a cohort at a time: asked from Optuna, trained together, each reported, pruned or completed alone,
and a trial that leaves is replaced by a new one while the call has trials to give, so the cohort stays full.

Each trial is its own MLflow child run, tagged with its cohort (the first trial's number) and size; a
complete trial's model is logged off the training path, and only then is Optuna told it is complete.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cnnexp.cohort import Member, MemberResult, fit_cohort, new_cohort
from cnnexp.config import TuneConfig
from cnnexp.data import PreparedData
from cnnexp.model import Network, to_inputs
from cnnexp.processes import owner
from cnnexp.tracking import tags
from cnnexp.tracking.log import log_child_epoch, split_dataset
from cnnexp.tracking.models import log_model_and_finish
from cnnexp.tracking.runs import end_child_run, error_text, start_child_run
from cnnexp.train import BestEpoch, NonFiniteLoss, fit, new_training_state, speed_options
from cnnexp.tuning.recovery import Heartbeat, queue_retry, retry_tags
from cnnexp.tuning.study import OBJECTIVE, Parent, has_heartbeats, suggest

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]
# grant(n): how many more trials (at most n) this worker may start now: its budget, or what a study's target lacks.
Grant = Callable[[int], int]


def run_name(number: int, params: dict) -> str:
    return f"trial-{number}-lr{params['lr']:.3g}-bs{params['batch_size']}"


@dataclass
class TrialRun:
    """A trial in flight: Optuna's handle, its params, its MLflow child run and its best epoch so far."""

    trial: optuna.Trial
    params: dict
    run_id: str
    best: BestEpoch = field(default_factory=BestEpoch)
    value: float | None = None  # what Optuna is told once the model is logged (config.objective)


def report(study: optuna.Study, callbacks: list[TrialCallback], trial: FrozenTrial) -> None:
    for callback in callbacks:
        callback(study, trial)


class ModelLogger:
    """Logs each complete trial's model on a background thread, then tells Optuna the trial is complete.

    Off the training path: 0.3-0.6 s per model against seconds per trial. Optuna hears of the trial
    only once its model is in, so a worker killed in between leaves the trial RUNNING, and it is failed
    and retried like any other (dead pid or heartbeat) instead of standing as a best trial with no model.
    close() waits for every job, so no worker exits with a run still open.
    """

    def __init__(self, study: optuna.Study, callbacks: list[TrialCallback], val) -> None:
        self.study, self.callbacks, self.val = study, callbacks, val
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="model-logger", daemon=True)
        self.thread.start()

    def submit(self, run: TrialRun, model: torch.nn.Module, example: torch.Tensor, classes: list[str]) -> None:
        """The trial's model (already its kept epoch's weights, a copy that no training touches)."""
        self.jobs.put((run, model.cpu(), example.cpu(), classes))

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            run, model, example, classes = job
            log_model_and_finish(run.run_id, model, example, classes, run.best.epoch, run.best.summary(), self.val)
            report(self.study, self.callbacks, self.study.tell(run.trial, run.value))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class _MemberLeft(Exception):
    """Ends a one-trial `fit` whose trial was pruned (a cohort drops the member instead)."""


class CohortRunner:
    """Runs trials K at a time: asks Optuna for K distinct points, trains them as one fused cohort (a lone
    trial with plain `fit`), reports every epoch to every trial and prunes, fails or completes each on its
    own.
    """

    def __init__(self, study: optuna.Study, config: TuneConfig, data: PreparedData, device: torch.device,
                 parent: Parent, callbacks: list[TrialCallback]):
        self.study, self.config, self.data, self.device, self.parent = study, config, data, device, parent
        self.callbacks = callbacks
        self.models = ModelLogger(study, callbacks, split_dataset(data, "val"))
        self.active: dict[int, TrialRun] = {}
        self.started = 0

    def run(self, size: int, grant: Grant) -> int:
        """Trains a cohort of up to `size` trials, refilled as they leave while grant() gives more; returns
        how many trials it started (0: none granted)."""
        if has_heartbeats(self.config.storage):
            optuna.storages.fail_stale_trials(self.study)
        self.active, self.started, self.size, self.grant = {}, 0, size, grant
        self.cohort_tags = {}
        if not self._ask_and_start(size):
            return 0
        try:
            with Heartbeat(self.study, lambda: [r.trial for r in list(self.active.values())]) \
                    if has_heartbeats(self.config.storage) else contextlib.nullcontext():
                self._train()
        except KeyboardInterrupt:
            for run in self.active.values():
                self._interrupted(run)
            raise
        except Exception as err:  # noqa: BLE001 - the trials fail; the study goes on, as study.optimize(catch=...)
            for run in self.active.values():
                self._end(run, "FAILED", TrialState.FAIL, {tags.ERROR: error_text(err)})
        self.active = {}
        return self.started

    def close(self) -> None:
        self.models.close()

    def _ask_and_start(self, wanted: int) -> list[int]:
        """Asks up to `wanted` trials (as grant allows, counted again before each) and starts their runs;
        returns their member ids. Asked one after the other, each after the previous one's params: the
        samplers' constant liar (TPE, GP) then keeps the points of trials in flight apart."""
        joined = []
        while len(joined) < wanted and self.grant(1):
            trial, params = self._ask()
            if not self.cohort_tags:  # the cohort is named after its first trial, and sized by its capacity
                self.cohort_tags = {tags.COHORT: str(trial.number), tags.COHORT_SIZE: str(self.size)}
            member_id = self.started
            self.active[member_id] = self._start(trial, params, self.cohort_tags)
            self.started += 1
            joined.append(member_id)
        return joined

    def _ask(self) -> tuple[optuna.Trial, dict]:
        trial = self.study.ask()
        return trial, suggest(trial, self.config)

    def _start(self, trial: optuna.Trial, params: dict, cohort: dict) -> TrialRun:
        run_id = start_child_run(
            self.parent.run_id, self.parent.experiment_id, run_name(trial.number, params),
            {**params, "epochs": self.config.epochs, "seed": self.config.seed},
            {tags.TRIAL_NUMBER: str(trial.number), tags.STUDY_NAME: self.config.study_name,
             tags.DEVICE: str(self.device), **cohort, **retry_tags(trial)},
        )
        # Who runs it: a trial whose process is gone can then be told from one still running elsewhere.
        trial.set_user_attr("worker", owner())
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("mlflow_parent_run_id", self.parent.run_id)
        trial.set_user_attr("cohort", int(cohort[tags.COHORT]))
        return TrialRun(trial, params, run_id)

    def _train(self) -> None:
        splits, epochs, options = self.data.splits, self.config.epochs, speed_options(self.config)
        members = [Member(run.params["lr"], run.params["batch_size"]) for run in self.active.values()]
        if self.size > 1:
            group = new_cohort(members, self.config.seed, self.device)

            def on_epoch_end(results: dict[int, MemberResult]) -> set[int]:
                leaving = self._epoch_end(results, group.weights)
                for member_id in self._ask_and_start(self.size - (len(group.ids) - len(leaving))):
                    params = self.active[member_id].params
                    group.add(member_id, Member(params["lr"], params["batch_size"]), self.config.seed)
                return leaving

            fit_cohort(group, splits["train"], splits["val"], epochs=epochs, on_epoch_end=on_epoch_end, **options)
            return
        state = new_training_state(members[0].lr, self.config.seed, self.device)

        def on_epoch_end(metrics: dict) -> None:
            if self._epoch_end({0: metrics}, lambda _: state.model):
                raise _MemberLeft

        try:
            fit(state, splits["train"], splits["val"], batch_size=members[0].batch_size, epochs=epochs,
                on_epoch_end=on_epoch_end, **options)
        except NonFiniteLoss as err:
            self._epoch_end({0: err}, lambda _: state.model)
        except _MemberLeft:
            pass

    def _epoch_end(self, results: dict[int, MemberResult], weights: Callable[[int], torch.nn.Module | dict]) -> set[int]:
        """Each member's epoch, in both stores; returns the members that leave (pruned, diverged, complete).

        weights(member): its live weights, copied by its BestEpoch when this epoch is its best so far.
        """
        leaving = set()
        for member_id, result in results.items():
            run = self.active[member_id]
            if isinstance(result, NonFiniteLoss):
                self._end(run, "FAILED", TrialState.FAIL, {tags.ERROR: error_text(result)})
            else:
                run.best.update(result["epoch"], result[OBJECTIVE], weights(member_id))
                if not self._report(run, result):
                    continue
            leaving.add(member_id)
            del self.active[member_id]
            if isinstance(result, dict) and result["epoch"] == self.config.epochs:
                # objective=best (the default): the value of the model it logs, its best epoch's.
                run.value = run.best.val_accuracy if self.config.objective == "best" else result[OBJECTIVE]
                example = to_inputs(self.data.splits["val"].images[:4])
                model = run.best.restore(Network(num_classes=len(self.data.classes)))
                self.models.submit(run, model, example, self.data.classes)
        return leaving

    def _report(self, run: TrialRun, metrics: dict) -> bool:
        """Logs and reports one epoch; True when the trial is done (its last epoch, or pruned)."""
        log_child_epoch(run.run_id, metrics)
        epoch = metrics["epoch"]
        run.trial.report(metrics[OBJECTIVE], epoch)
        if epoch == self.config.epochs:
            return True
        # After the last epoch pruning saves nothing and would only discard a finished result
        # (successive halving has a rung at epoch 3, the end of a 3-epoch study).
        if run.trial.should_prune():
            self._end(run, "KILLED", TrialState.PRUNED, {tags.PRUNED: "true", tags.PRUNED_AT_EPOCH: epoch})
            return True
        return False

    def _end(self, run: TrialRun, status: str, state: TrialState, run_tags: dict) -> None:
        end_child_run(run.run_id, status, run_tags)
        report(self.study, self.callbacks, self.study.tell(run.trial, state=state))

    def _interrupted(self, run: TrialRun) -> None:
        """Ctrl-C: KILLED in MLflow; Optuna has no such state, so FAIL, marked, and queued for the next call."""
        run.trial.set_user_attr(tags.INTERRUPTED, True)
        end_child_run(run.run_id, "KILLED", {tags.INTERRUPTED: "true"})
        self.study.tell(run.trial, state=TrialState.FAIL)
        queue_retry(self.study, run.trial.number, run.params, run.run_id)
