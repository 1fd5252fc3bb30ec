"""A worker's trials: asked from Optuna one at a time into the free slots of one engine, trained side by side,
each reported, pruned or completed alone; a trial that leaves frees its slot for the next one granted.

Each trial is its own MLflow child run. Every MLflow call (creating the run, its epochs, its end, its model)
goes to one background queue, so the device never waits for the tracking store, and a trial's end is told
to Optuna there, after its run's. Asking, reporting and pruning, which decide who trains next, stay on the
training path.
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

from cnnexp.config import TuneConfig
from cnnexp.data import PreparedData
from cnnexp.engine import Engine, MemberResult, NonFiniteLoss
from cnnexp.model import Network, to_inputs
from cnnexp.processes import owner
from cnnexp.tracking import tags
from cnnexp.tracking.log import data_tags, log_child_epoch, split_dataset
from cnnexp.tracking.models import log_model_and_finish
from cnnexp.tracking.runs import end_child_run, error_text, start_child_run
from cnnexp.train import BestEpoch, new_training_state, speed_options
from cnnexp.tuning.optuna_private import record_heartbeat
from cnnexp.tuning.recovery import Heartbeat, queue_retry, retry_tags
from cnnexp.tuning.space import suggest
from cnnexp.tuning.study import OBJECTIVE, Parent, has_heartbeats

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]
# grant(n): how many more trials (at most n) this worker may start now: its budget, or what a study's target lacks.
Grant = Callable[[int], int]


def run_name(number: int, params: dict) -> str:
    return f"trial-{number}-lr{params['lr']:.3g}-bs{params['batch_size']}"


@dataclass
class TrialRun:
    """A trial in flight: Optuna's handle, its params, its MLflow child run and its best epoch so far. Its
    training state is the engine's alone (Engine.state)."""

    trial: optuna.Trial
    params: dict = field(default_factory=dict)  # set once suggested
    run_id: str = ""  # set by the tracker's queue when it has created the run, before any later job for it
    best: BestEpoch = field(default_factory=BestEpoch)
    value: float | None = None  # what Optuna is told once the model is logged (config.objective)


def report(study: optuna.Study, callbacks: list[TrialCallback], trial: FrozenTrial) -> None:
    for callback in callbacks:
        callback(study, trial)


class Tracker:
    """MLflow's side of the trials, in order, on one background thread: the device never waits for it.

    A complete trial's model is logged there too, and only then is Optuna told the trial is complete: a
    worker killed in between leaves the trial RUNNING, and it is failed and retried like any other (dead
    pid or heartbeat) instead of standing as a best trial with no model. A job handed over always runs:
    submit never raises, so a trial whose end is queued is told, whatever failed before. An error in a job
    is raised in the training thread at its next check, drain or close. close() waits for every job, so
    no worker exits with a run still open.
    """

    def __init__(self, study: optuna.Study, callbacks: list[TrialCallback], val) -> None:
        self.study, self.callbacks, self.val = study, callbacks, val
        self.jobs: queue.Queue = queue.Queue()
        # Trials whose end is queued but not yet told: still RUNNING in Optuna, so their heartbeats go on (a
        # model's upload can outlast the grace period on a busy machine, and another worker would fail it).
        self._telling: dict[int, TrialRun] = {}
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.raised: BaseException | None = None  # the last error handed over: the runner tells it from training's
        self.thread = threading.Thread(target=self._work, name="tracker", daemon=True)
        self.thread.start()

    def submit(self, job: Callable[..., None], *args) -> None:
        self.jobs.put((job, args))

    def telling(self) -> list[TrialRun]:
        """The trials handed over whose tell has not happened yet."""
        with self._lock:
            return list(self._telling.values())

    def _tell(self, run: TrialRun, **outcome) -> None:
        try:
            told = self.study.tell(run.trial, **outcome)
        finally:
            with self._lock:
                self._telling.pop(id(run), None)
        report(self.study, self.callbacks, told)

    def _hand_over(self, run: TrialRun, job: Callable[[], None]) -> None:
        with self._lock:
            self._telling[id(run)] = run
        self.submit(job)

    def drain(self) -> None:
        """Waits until every job so far is done."""
        self.jobs.join()
        self.check()

    def check(self) -> None:
        """Raises the first error of a job done since the last check."""
        if self.error is not None:
            self.raised, self.error = self.error, None
            raise self.raised

    def _work(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, args = item
            try:
                job(*args)  # every job runs, each trial's tell above all, whatever failed before
            except BaseException as err:  # noqa: BLE001 - the first is handed to the training thread
                self.error = self.error or err
            finally:
                self.jobs.task_done()
        self.jobs.task_done()

    def start(self, run: TrialRun, name: str, params: dict, run_tags: dict, parent: Parent) -> None:
        def create() -> None:
            run.run_id = start_child_run(parent.run_id, parent.experiment_id, name, params, run_tags)
            run.trial.set_user_attr("mlflow_run_id", run.run_id)
        self.submit(create)

    def epoch(self, run: TrialRun, metrics: dict) -> None:
        self.submit(lambda: log_child_epoch(run.run_id, metrics))

    def end(self, run: TrialRun, status: str, state: TrialState, run_tags: dict) -> None:
        """The run ends, then Optuna hears of it (after the run's id is on the trial, which a told trial
        could no longer take)."""
        def end_and_tell() -> None:
            try:
                if run.run_id:  # a trial that failed before its run was created has no run to end
                    end_child_run(run.run_id, status, run_tags)
            finally:  # the trial's fate is decided whether or not MLflow took it
                self._tell(run, state=state)
        self._hand_over(run, end_and_tell)

    def complete(self, run: TrialRun, model: torch.nn.Module, example: torch.Tensor, classes: list[str]) -> None:
        """The trial's model (already its kept epoch's weights, a copy that no training touches), then the tell."""
        def log_and_tell() -> None:
            try:
                log_model_and_finish(run.run_id, model, example, classes, run.best.epoch, run.best.summary(),
                                     self.val)
            except BaseException:
                # Not complete without its model, and not left RUNNING for a live worker to wait on.
                self._tell(run, state=TrialState.FAIL)
                raise
            self._tell(run, values=run.value)
        self._hand_over(run, log_and_tell)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.check()


class TrialRunner:
    """Runs up to `size` trials at once in one engine: asks Optuna for a trial per free slot, reports every
    epoch to every trial, and prunes, fails or completes each on its own, freeing its slot for the next."""

    def __init__(self, study: optuna.Study, config: TuneConfig, data: PreparedData, device: torch.device,
                 parent: Parent, callbacks: list[TrialCallback], make_engine: Callable[..., Engine] | None = None):
        """make_engine: Engine (the default), or a stand-in with its interface (tests of the runner alone)."""
        self.study, self.config, self.data, self.device, self.parent = study, config, data, device, parent
        self.make_engine = make_engine or Engine
        self.callbacks = callbacks
        self.tracker = Tracker(study, callbacks, split_dataset(data, "val"))
        self.active: dict[int, TrialRun] = {}
        self.started = 0

    def run(self, size: int, grant: Grant) -> int:
        """Trains up to `size` trials at once, a trial that leaves replaced while grant() gives more; returns
        how many trials it started. The grant is asked before the engine is built: none granted, no engine."""
        if not grant(1):
            return 0
        self.active, self.asked, self.started = {}, None, 0
        self.grant, self.granted = grant, 1
        splits = self.data.splits
        # Batch-size tables on CUDA streams of their own ran side by side 1.3-1.5x faster than one after the
        # other (docs/performance.md).
        engine = self.make_engine(size, splits["train"], splits["val"], self.device, streams=True, **speed_options(self.config))
        try:  # from the first ask on: every trial asked is told, whatever fails or interrupts
            with Heartbeat(self.study, lambda: [r.trial for r in (*self._unfinished(), *self.tracker.telling())]) \
                    if has_heartbeats(self.config.storage) else contextlib.nullcontext():
                self._fill(engine)
                for results in engine.epochs():
                    for slot, result in results.items():
                        if self._epoch_end(slot, result, engine):
                            engine.leave(slot)
                    self.tracker.check()  # a tracking store that failed stops the call before more are asked
                    self._fill(engine)
                self.tracker.drain()  # with the heartbeats on: the last trials are told only once their models are in
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):  # the runs must exist before they can be ended
                self.tracker.drain()
            for run in self._unfinished():
                self._interrupted(run)
            raise
        except Exception as err:  # noqa: BLE001 - the trials fail; the study goes on, as study.optimize(catch=...)
            for run in self._unfinished():
                self._end(run, "FAILED", TrialState.FAIL, {tags.ERROR: error_text(err)})
            if err is self.tracker.raised:  # but a tracking store that failed stops the call, its trials told
                self.tracker.drain()
                raise
        self.active = {}
        self.tracker.drain()  # a tracking store that failed stops the call, with its own one line
        return self.started

    def _unfinished(self) -> list[TrialRun]:
        """The trials asked whose end is not yet with the tracker: in slots, and one being asked."""
        return [*self.active.values(), *([self.asked] if self.asked else [])]

    def close(self) -> None:
        self.tracker.close()

    def _fill(self, engine: Engine) -> None:
        """Asks a trial for each free slot (as grant allows, counted again before each) and starts it. Asked
        one after the other, each after the previous one's params: the samplers' constant liar (TPE, GP)
        then keeps the points of trials in flight apart."""
        if engine.free and has_heartbeats(self.config.storage):
            # A dead worker's trials are failed and queued again before this one asks, so their retries
            # are among what it may take.
            optuna.storages.fail_stale_trials(self.study)
        while engine.free and self._may_start():
            run = self.asked = TrialRun(self.study.ask())
            self.started += 1
            if has_heartbeats(self.config.storage):
                # Optuna calls a trial stale only once it has beaten: one that joined between two beats and
                # lost its worker before the next would stay RUNNING for good, and workers wait for it.
                record_heartbeat(self.study, run.trial)
            run.params = suggest(run.trial, self.config)
            state = new_training_state(run.params["lr"], self.config.seed, self.device)
            slot = engine.join(state, run.params["batch_size"])
            self.active[slot], self.asked = run, None
            self._start(run)

    def _may_start(self) -> bool:
        """One more trial granted: the one run() was granted before building the engine first."""
        if self.granted:
            self.granted = 0
            return True
        return bool(self.grant(1))

    def _start(self, run: TrialRun) -> None:
        trial, params = run.trial, run.params
        self.tracker.start(run, run_name(trial.number, params), {**params, "epochs": self.config.epochs, "seed": self.config.seed},
                           {tags.TRIAL_NUMBER: str(trial.number), tags.STUDY_NAME: self.config.study_name,
                            tags.DEVICE: str(self.device), **data_tags(self.data), **retry_tags(trial)},
                           self.parent)
        # Who runs it: a trial whose process is gone can then be told from one still running elsewhere.
        trial.set_user_attr("worker", owner())
        trial.set_user_attr("mlflow_parent_run_id", self.parent.run_id)

    def _epoch_end(self, slot: int, result: MemberResult, engine: Engine) -> bool:
        """A member's epoch, in both stores; True when it leaves (pruned, diverged, complete).

        A trial leaves `active` as its end is queued for the tracker (which tells Optuna), in one statement:
        whatever fails or interrupts before, the runner still holds it and ends it."""
        if isinstance(result, NonFiniteLoss):
            self._end(self.active.pop(slot), "FAILED", TrialState.FAIL, {tags.ERROR: error_text(result)})
            return True
        run, epoch = self.active[slot], result["epoch"]
        run.best.update(epoch, result[OBJECTIVE], engine.state(slot))
        self.tracker.epoch(run, result)
        run.trial.report(result[OBJECTIVE], epoch)
        if epoch == self.config.epochs:
            self._complete(slot, result)
            return True
        # After the last epoch pruning saves nothing and would only discard a finished result
        # (successive halving has a rung at epoch 3, the end of a 3-epoch study).
        if run.trial.should_prune():
            self._end(self.active.pop(slot), "KILLED", TrialState.PRUNED, {tags.PRUNED: "true", tags.PRUNED_AT_EPOCH: epoch})
            return True
        return False

    def _complete(self, slot: int, result: dict) -> None:
        run = self.active[slot]
        # objective=best (the default): the value of the model it logs, its best epoch's.
        run.value = run.best.val_accuracy if self.config.objective == "best" else result[OBJECTIVE]
        example = to_inputs(self.data.splits["val"].images[:4])
        model = run.best.restore(Network(num_classes=len(self.data.classes)))
        self.tracker.complete(self.active.pop(slot), model, example, self.data.classes)

    def _end(self, run: TrialRun, status: str, state: TrialState, run_tags: dict) -> None:
        self.tracker.end(run, status, state, run_tags)

    def _interrupted(self, run: TrialRun) -> None:
        """Ctrl-C: KILLED in MLflow; Optuna has no such state, so FAIL, marked, and queued for the next call."""
        try:
            run.trial.set_user_attr(tags.INTERRUPTED, True)
            if run.run_id:  # a trial interrupted before its run was created has none to end
                end_child_run(run.run_id, "KILLED", {tags.INTERRUPTED: "true"})
        finally:  # told whether or not MLflow took it
            self.study.tell(run.trial, state=TrialState.FAIL)
            if run.params:  # a trial interrupted before its params were suggested has nothing to retry
                queue_retry(self.study, run.trial.number, run.params, run.run_id)
