"""Optuna wiring: the study, the objective (the same `fit` as train, plus callbacks), workers, figures.

The only module that imports optuna. Every trial is an MLflow child run of the study's run; the run's
final status is set before Optuna records the trial's state, from the same outcome:
complete -> FINISHED (once its model is logged, off the training path), pruned -> KILLED (tag
pruned_at_epoch), exception or non-finite loss -> FAILED (tag error).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from cnnexp import tracking
from cnnexp.cohort import Member, MemberResult, fit_cohort, new_cohort
from cnnexp.config import DEFAULT_COHORT, ConfigError, TuneConfig, WorkerConfig, first_line, verbose
from cnnexp.data import PreparedData, load_prepared
from cnnexp.devices import resolve_device
from cnnexp.evaluate import predict, score
from cnnexp.model import Network, to_inputs
from cnnexp.train import BestEpoch, NonFiniteLoss, fit, new_training_state, speed_options

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]
OBJECTIVE = tracking.JUDGED_BY  # a trial's value is its model's, as compare and the champion rule judge it
# Heartbeats (RDB storages): a live worker beats every 10 s; a trial silent for 30 s is failed and retried.
# 30 s is three missed beats, so a worker slowed by a busy machine or a slow database round trip is not
# failed by mistake, while a dead worker's trial is retried within about half a minute (plus the next
# check, which happens whenever any worker starts a trial or waits for the study to finish).
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
MAX_RETRY = 2  # a trial that kills its worker three times is not tried again
WAIT_POLL_S = 5  # how often a worker with nothing to start checks the study again
# What `tune` fixes for the whole study; a joining worker takes these from the study, so no machine drifts.
STUDY_SETTINGS = ("epochs", "lr_min", "lr_max", "batch_min", "batch_max", "sampler", "pruner", "seed", "dataset",
                  "bf16", "torch_compile")


@dataclass(frozen=True)
class Parent:
    """What a worker process needs to log its trials under the study's run."""

    run_id: str
    experiment_id: str
    tracking_uri: str


# --- study -----------------------------------------------------------------------------------

def quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created ...") and ExperimentalWarnings (heartbeats on PostgreSQL)
    stay out of a normal run's output; every process that opens a study passes here, spawned workers too."""
    if verbose():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(storage: str) -> optuna.storages.BaseStorage | str:
    """A plain path is a journal file (multi-process safe, no sqlite locks); a database URL gets heartbeats.

    sqlite is left without them: it is one machine's file, where a dead worker is found by its pid
    (recover_dead_trials), and a heartbeat thread per worker would only add lock contention.
    """
    quiet_optuna()
    if "://" not in storage:
        if not os.path.isdir(os.path.dirname(storage) or "."):
            raise ConfigError("storage", f"{storage}: directory {os.path.dirname(storage)} does not exist; "
                                         "create it or choose a path in an existing one")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    heartbeat = {}
    if has_heartbeats(storage):
        heartbeat = dict(heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
                         heartbeat_stale_trial_callback=FailStaleRunAndRetry())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(storage, **heartbeat)
    except Exception as err:  # SQLAlchemy and drivers raise many kinds; the user needs the first line
        raise ConfigError("storage", f"cannot open {tracking.redact_url(storage)}: {first_line(err)}") from None


def has_heartbeats(storage: str) -> bool:
    """Database URLs other than sqlite: dead workers are found by heartbeat there, by pid elsewhere."""
    return "://" in storage and not storage.startswith("sqlite")


def sampler_seed(seed: int, worker: int, trials_before: int) -> int:
    """Differs per worker (or parallel workers would propose the same points) and per call: a resumed
    study has more trials, so it explores new points, and the same sequence of calls repeats exactly."""
    return int(np.random.SeedSequence([seed, worker % 2**32, trials_before]).generate_state(1)[0])


def make_sampler(config: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    # constant_liar (Optuna 5's default, stated): the trials of a cohort are asked before any of them
    # reports, and each is kept away from the others' points.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "asha":
        # The default: replayed over 8 studies on the real sample it saved 46-66% of the epochs (median
        # 32% for the median pruner, which can prune none of its first 5 trials), losing the best trial
        # on the same one study as median did (benchmarks/pruner_replay.py, docs/performance.md).
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.epochs)
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    # fit reports epochs from 1, so a trial can be pruned after its first epoch once 5 trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=5)


def load_study(config: TuneConfig, worker: int = 0) -> optuna.Study:
    study = optuna.create_study(
        storage=open_storage(config.storage), study_name=config.study_name, direction="maximize",
        sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(config), load_if_exists=True,
    )
    study.sampler = make_sampler(config, sampler_seed(config.seed, worker, len(study.get_trials(deepcopy=False))))
    return study


def with_study_settings(config: TuneConfig) -> TuneConfig:
    """The config with an existing study's settings for those left at their default; others must match.

    So `tune --study-name s --n-trials 5` extends study s as it was created, without repeating its flags.
    A value given here (other than the default) that differs from the study's is refused, naming it:
    the study's trials would no longer be comparable. (Under `mlflow run` every parameter arrives as a
    flag, so a default counts as not given there too.)
    """
    try:
        stored = optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage)).user_attrs
    except KeyError:  # a new study
        return config
    settings = stored.get("settings", {})
    defaults = TuneConfig()
    for name, value in settings.items():
        given = getattr(config, name)
        if given != value and given != getattr(defaults, name):
            raise ConfigError(name, f"study {config.study_name!r} was created with {name}={value!r}, got {given!r}"
                                    f" (leave it out to keep the study's, or use a new study_name to change it)")
    return dataclasses.replace(config, **settings)


def register(study: optuna.Study, config: TuneConfig, parent: Parent, data_digest: str) -> int:
    """Records on the study what a joining worker needs; returns its trial count (complete or pruned).

    config has the study's settings already (with_study_settings). The latest `tune` owns the parent run
    that workers log under.
    """
    target = finished_count(study) + config.n_trials
    attrs = {"settings": {name: getattr(config, name) for name in STUDY_SETTINGS}, "data_digest": data_digest,
             "mlflow_parent_run_id": parent.run_id, "mlflow_experiment_id": parent.experiment_id, "target_trials": target}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return target


def check_digest(study: optuna.Study, data_digest: str, param: str) -> None:
    expected = study.user_attrs.get("data_digest")
    if expected is not None and expected != data_digest:
        raise ConfigError(param, f"prepared data (digest {data_digest[:12]}) differs from study "
                                 f"{study.study_name!r}'s (digest {expected[:12]}); prepare the same source")


def joined(config: WorkerConfig) -> tuple[optuna.Study, TuneConfig]:
    """The study a worker joins, and the tune settings it runs with (the study's, plus this machine's own)."""
    try:
        study = optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage))
    except KeyError:
        raise ConfigError("study_name", f"no study {config.study_name!r} in {tracking.redact_url(config.storage)}; "
                                        "create it with `cnnexp tune`") from None
    if "settings" not in study.user_attrs:
        raise ConfigError("study_name", f"study {config.study_name!r} was not created by `cnnexp tune`")
    local = {name: getattr(config, name) for name in ("storage", "study_name", "timeout", "workers", "cohort", "device", "data_dir", "source")}
    return study, TuneConfig(**study.user_attrs["settings"], **local, n_trials=max(config.n_trials, 1))


def joining_offset() -> int:
    """A sampler-seed offset that differs between joining processes on any machines (host and pid)."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def reached_target(study: optuna.Study, target: int) -> bool:
    """The study has its target of complete or pruned trials and none still running anywhere."""
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    return states[TrialState.COMPLETE] + states[TrialState.PRUNED] >= target and not states[TrialState.RUNNING]


def search_space(config: TuneConfig) -> dict:
    return {"lr": {"low": config.lr_min, "high": config.lr_max, "log": True}, "batch_size": config.batch_sizes}


def suggest(trial: optuna.Trial, config: TuneConfig) -> dict:
    return {
        "lr": trial.suggest_float("lr", config.lr_min, config.lr_max, log=True),
        "batch_size": trial.suggest_categorical("batch_size", config.batch_sizes),
    }


def study_settings(config: TuneConfig) -> dict:
    """Parent-run params: the search space and how it is searched (storage without password)."""
    return {
        "search_space": search_space(config), "sampler": config.sampler, "pruner": config.pruner,
        "storage": tracking.redact_url(config.storage), "study_name": config.study_name, "objective": f"maximize {OBJECTIVE}",
    }


# --- trials, a cohort at a time --------------------------------------------------------------

def run_name(number: int, params: dict) -> str:
    return f"trial-{number}-lr{params['lr']:.3g}-bs{params['batch_size']}"


@dataclass
class TrialRun:
    """A trial in flight: Optuna's handle, its params, its MLflow child run and its best epoch so far."""

    trial: optuna.Trial
    params: dict
    run_id: str
    best: BestEpoch = field(default_factory=BestEpoch)


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
            tracking.log_model_and_finish(run.run_id, model, example, classes, run.best.epoch, run.best.summary(), self.val)
            # The trial's value is its model's: the best epoch's val_accuracy.
            report(self.study, self.callbacks, self.study.tell(run.trial, run.best.val_accuracy))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def report(study: optuna.Study, callbacks: list[TrialCallback], trial: FrozenTrial) -> None:
    for callback in callbacks:
        callback(study, trial)


class Heartbeat:
    """Beats for the cohort's running trials on storages with heartbeats (what study.optimize does per
    trial, which ask-and-tell leaves to the caller)."""

    def __init__(self, study: optuna.Study, trials: list[optuna.Trial]):
        self.storage, self.trial_ids = study._storage, [t._trial_id for t in trials]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                with contextlib.suppress(Exception):  # a finished trial, or a database hiccup: next beat
                    self.storage.record_heartbeat(trial_id)
            if self.stop.wait(HEARTBEAT_INTERVAL_S):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class _MemberLeft(Exception):
    """Ends a one-trial `fit` whose trial was pruned (a cohort drops the member instead)."""


class CohortRunner:
    """Runs trials K at a time: asks Optuna for K distinct points, trains them as one fused cohort (a lone
    trial with plain `fit`), reports every epoch to every trial and prunes, fails or completes each on its
    own. Each trial is its own MLflow child run, tagged with its cohort (the first trial's number) and size.
    """

    def __init__(self, study: optuna.Study, config: TuneConfig, data: PreparedData, device: torch.device,
                 parent: Parent, callbacks: list[TrialCallback]):
        self.study, self.config, self.data, self.device, self.parent = study, config, data, device, parent
        self.callbacks = callbacks
        self.models = ModelLogger(study, callbacks, tracking.split_dataset(data, "val"))
        self.active: dict[int, TrialRun] = {}

    def run(self, size: int) -> None:
        if has_heartbeats(self.config.storage):
            optuna.storages.fail_stale_trials(self.study)
        # Asked one after the other, each after the previous one's params: the samplers' constant liar
        # (TPE, GP) then keeps the cohort's points apart.
        self.active = {}
        asked = [self._ask() for _ in range(size)]
        cohort = {"cohort": str(asked[0][0].number), "cohort_size": str(size)}
        for member_id, (trial, params) in enumerate(asked):
            self.active[member_id] = self._start(trial, params, cohort)
        try:
            with Heartbeat(self.study, [r.trial for r in self.active.values()]) if has_heartbeats(self.config.storage) \
                    else contextlib.nullcontext():
                self._train()
        except KeyboardInterrupt:
            for run in self.active.values():
                self._interrupted(run)
            raise
        except Exception as err:  # noqa: BLE001 - the trials fail; the study goes on, as study.optimize(catch=...)
            for run in self.active.values():
                self._end(run, "FAILED", TrialState.FAIL, {tracking.ERROR_TAG: tracking.error_text(err)})
        self.active = {}

    def close(self) -> None:
        self.models.close()

    def _ask(self) -> tuple[optuna.Trial, dict]:
        trial = self.study.ask()
        return trial, suggest(trial, self.config)

    def _start(self, trial: optuna.Trial, params: dict, cohort: dict) -> TrialRun:
        run_id = tracking.start_child_run(
            self.parent.run_id, self.parent.experiment_id, run_name(trial.number, params),
            {**params, "epochs": self.config.epochs, "seed": self.config.seed},
            {"optuna.trial_number": str(trial.number), "optuna.study_name": self.config.study_name,
             "device": str(self.device), **cohort, **retry_tags(trial)},
        )
        # Who runs it: a trial whose process is gone can then be told from one still running elsewhere.
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("mlflow_parent_run_id", self.parent.run_id)
        trial.set_user_attr("cohort", int(cohort["cohort"]))
        return TrialRun(trial, params, run_id)

    def _train(self) -> None:
        splits, epochs, options = self.data.splits, self.config.epochs, speed_options(self.config)
        members = [Member(run.params["lr"], run.params["batch_size"]) for run in self.active.values()]
        if len(members) > 1:
            group = new_cohort(members, self.config.seed, self.device)
            fit_cohort(group, splits["train"], splits["val"], epochs=epochs,
                       on_epoch_end=lambda results: self._epoch_end(results, group.weights), **options)
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
                self._end(run, "FAILED", TrialState.FAIL, {tracking.ERROR_TAG: tracking.error_text(result)})
            else:
                run.best.update(result["epoch"], result[OBJECTIVE], weights(member_id))
                if not self._report(run, result):
                    continue
            leaving.add(member_id)
            del self.active[member_id]
            if isinstance(result, dict) and result["epoch"] == self.config.epochs:
                example = to_inputs(self.data.splits["val"].images[:4])
                model = run.best.restore(Network(num_classes=len(self.data.classes)))
                self.models.submit(run, model, example, self.data.classes)
        return leaving

    def _report(self, run: TrialRun, metrics: dict) -> bool:
        """Logs and reports one epoch; True when the trial is done (its last epoch, or pruned)."""
        tracking.log_child_epoch(run.run_id, metrics)
        epoch = metrics["epoch"]
        run.trial.report(metrics[OBJECTIVE], epoch)
        if epoch == self.config.epochs:
            return True
        # After the last epoch pruning saves nothing and would only discard a finished result
        # (successive halving has a rung at epoch 3, the end of a 3-epoch study).
        if run.trial.should_prune():
            self._end(run, "KILLED", TrialState.PRUNED, {"pruned": "true", "pruned_at_epoch": epoch})
            return True
        return False

    def _end(self, run: TrialRun, status: str, state: TrialState, tags: dict) -> None:
        tracking.end_child_run(run.run_id, status, tags)
        report(self.study, self.callbacks, self.study.tell(run.trial, state=state))

    def _interrupted(self, run: TrialRun) -> None:
        """Ctrl-C: KILLED in MLflow; Optuna has no such state, so FAIL, marked, and queued for the next call."""
        run.trial.set_user_attr("interrupted", True)
        tracking.end_child_run(run.run_id, "KILLED", {"interrupted": "true"})
        self.study.tell(run.trial, state=TrialState.FAIL)
        queue_retry(self.study, run.trial.number, run.params, run.run_id)


def queue_retry(study: optuna.Study, number: int, params: dict, run_id: str) -> None:
    """The trial's params queued again (WAITING), naming the trial and run it retries (see retry_tags)."""
    study.enqueue_trial(params, user_attrs={"retry_of": number, "retry_of_run_id": run_id})


def retry_tags(trial: optuna.Trial) -> dict[str, str]:
    """A retried trial's run names the trial and run it retries (recorded when it was queued again)."""
    attrs = trial.user_attrs
    if "retry_of" not in attrs:
        return {}
    return {"retry_of": str(attrs["retry_of"]), "retry_of_run_id": str(attrs.get("retry_of_run_id", ""))}


# --- workers ---------------------------------------------------------------------------------

class TrialBudget:
    """The trials this call may still start, shared by its local worker processes: each claims a cohort's
    worth before starting it, so the call runs exactly n_trials, and a worker that started late (a spawned
    process imports for seconds) or drew short trials (pruned, large batches) takes more of them."""

    def __init__(self, context: multiprocessing.context.BaseContext, n_trials: int):
        self.remaining = context.Value("i", n_trials)

    def claim(self, wanted: int = 1) -> int:
        """Up to `wanted` trials; 0 when the budget is spent."""
        with self.remaining.get_lock():
            granted = max(0, min(wanted, self.remaining.value))
            self.remaining.value -= granted
            return granted


def worker_device(name: str, worker: int) -> torch.device:
    """With several GPUs, worker i takes GPU i mod count; an explicit cuda:N is honoured for all."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


def cohort_size(config: TuneConfig, device: torch.device) -> int:
    """The cohort parameter, or (0) the measured default for the device (benchmarks/README.md)."""
    return config.cohort or DEFAULT_COHORT.get(device.type, DEFAULT_COHORT["cpu"])


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """N workers on C cores: C // N threads each, or they oversubscribe the cores and all slow down.
    OMP_NUM_THREADS, where set, is this process's share of the host (scripts/local-cluster.sh sets it
    for the `cnnexp worker` processes it starts side by side)."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or cpu_cores()) // max(workers, 1))


def run_worker(config: TuneConfig, parent: Parent, worker: int, budget: TrialBudget, callbacks: list[TrialCallback],
               target: int | None = None, sampler_offset: int = 0) -> None:
    """Cohorts while the call's budget lasts, or (with a target) until the study has `target` complete
    or pruned trials. Loads data once and waits for its models to be logged."""
    torch.set_num_threads(threads_per_worker(config.workers))
    quiet_optuna()  # --verbose keeps Optuna's per-trial lines, in spawned workers too
    data = load_prepared(config.data_dir, config.dataset)
    study = load_study(config, worker + sampler_offset)
    device = worker_device(config.device, worker)
    runner = CohortRunner(study, config, data, device, parent, callbacks)
    size = cohort_size(config, device)
    try:
        if target is None:
            deadline = time.monotonic() + config.timeout if config.timeout else math.inf
            while time.monotonic() < deadline and (granted := budget.claim(size)):
                runner.run(granted)
        else:
            run_until(study, runner, target, size, config)
    finally:
        runner.close()


def run_until(study: optuna.Study, runner: CohortRunner, target: int, size: int, config: TuneConfig) -> None:
    """Cohorts until the study has `target` complete or pruned trials, however many machines take part.

    A trial running elsewhere counts as on its way; the worker waits for it rather than leaving, since
    if that worker died, its trial is failed and re-queued (heartbeat or pid check) and someone must run
    the retry, even when the others have reached the target meanwhile: nothing is left WAITING.
    A worker never starts more than `target` trials itself (a study that only fails must end).
    """
    deadline = time.monotonic() + config.timeout if config.timeout else math.inf
    started = 0
    while started < target and time.monotonic() < deadline:
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
        missing = target - finished - states[TrialState.RUNNING]
        if states[TrialState.WAITING] or missing > 0:
            # Optuna hands out waiting (retried) trials first.
            granted = min(size, max(states[TrialState.WAITING], missing), target - started)
            runner.run(granted)
            started += granted
            continue
        if finished >= target:
            return
        if has_heartbeats(config.storage):
            optuna.storages.fail_stale_trials(study)
        else:
            recover_dead_trials(study)
        time.sleep(WAIT_POLL_S)


def spawned_worker(config: TuneConfig, parent: Parent, worker: int, budget: TrialBudget,
                   callbacks: list[TrialCallback], target: int | None, sampler_offset: int) -> None:
    """Entry of a worker process: the parent's store, and SIGTERM (how `mlflow run` stops) as Ctrl-C,
    so its running trials end KILLED and are queued again instead of staying RUNNING."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tracking.use_tracking_uri(parent.tracking_uri)
    try:
        run_worker(config, parent, worker, budget, callbacks, target, sampler_offset)
    except KeyboardInterrupt:
        sys.exit(130)  # the trials are recorded as interrupted; the parent prints the one line


def workers_to_spawn(config: TuneConfig, size: int, target: int | None) -> range:
    """Worker numbers 1.. of the processes worth starting: none that could not get a cohort of its own."""
    if target is not None:
        return range(1, config.workers)
    return range(1, min(config.workers, math.ceil(config.n_trials / size)))


def run_workers(config: TuneConfig, parent: Parent, callbacks: list[TrialCallback], target: int | None = None,
                sampler_offset: int = 0) -> None:
    """Worker 0 runs here; the others are spawned processes on the same storage and parent run.

    Worker i seeds its sampler from seed + sampler_offset + i and the study's trial count: joining
    workers on other machines pass an offset of their own (joining_offset), or every machine's worker 0
    would propose the same points.

    First, trials that a dead worker of this machine left RUNNING are failed and queued again (on a
    storage with heartbeats, Optuna does that itself, for every machine).
    """
    if not has_heartbeats(config.storage):
        recover_dead_trials(load_study(config))
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    budget = TrialBudget(context, config.n_trials)
    size = cohort_size(config, worker_device(config.device, 0))
    others = [
        context.Process(target=spawned_worker, args=(config, parent, i, budget, callbacks, target, sampler_offset),
                        name=f"tune-worker-{i}")
        for i in workers_to_spawn(config, size, target)
    ]
    for process in others:
        process.start()
    try:
        run_worker(config, parent, 0, budget, callbacks, target, sampler_offset)
    finally:
        for process in others:
            process.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in others if p.exitcode not in (0, 130)]
    if failed:
        if has_heartbeats(config.storage):
            orphans = f"failed and queued again by heartbeat within {GRACE_PERIOD_S} s"
        else:
            orphans = f"now FAILED and queued again: {recover_dead_trials(load_study(config)) or 'none'}"
        raise RuntimeError(f"worker processes ended abnormally: {', '.join(failed)}; trials they left running {orphans}")


# --- dead workers ----------------------------------------------------------------------------

def end_trial_run(trial: FrozenTrial, reason: str) -> None:
    """The MLflow run of a trial whose worker is gone ends FAILED, with the reason as its error tag."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        tracking.end_child_run(run_id, "FAILED", {tracking.ERROR_TAG: reason})


class FailStaleRunAndRetry:
    """Heartbeat-stale trial (Optuna has just set it FAIL): its run ends FAILED, its params are queued again."""

    def __init__(self):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        end_trial_run(trial, f"its worker sent no heartbeat for {GRACE_PERIOD_S} s (process or machine gone)")
        # The retry copies the user attrs: not the dead worker's run and pid, which the retry replaces.
        trial.user_attrs.update(retry_of=trial.number, retry_of_run_id=trial.user_attrs.pop("mlflow_run_id", ""))
        trial.user_attrs.pop("worker", None)
        self.retry(study, trial)


def is_dead(worker: dict) -> bool:
    """A worker process of this host that no longer exists (a zombie still counts as alive)."""
    if worker.get("host") != socket.gethostname() or "pid" not in worker:
        return False
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
        queue_retry(study, trial.number, trial.params, trial.user_attrs.get("mlflow_run_id", ""))
    return [t.number for t in dead]


# --- after the study -------------------------------------------------------------------------

def summary(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    result = {
        "trials_complete": counts[TrialState.COMPLETE], "trials_pruned": counts[TrialState.PRUNED],
        "trials_failed": counts[TrialState.FAIL], "trials_total": len(trials),
    }
    if counts[TrialState.COMPLETE]:
        result.update(best_value=study.best_value, best_trial=study.best_trial.number, best_params=study.best_params)
    return result


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Optuna's trials_dataframe() plus each trial's MLflow run id, and its cohort where trials ran in cohorts."""
    frame = study.trials_dataframe()
    attrs = [trial.user_attrs for trial in study.get_trials(deepcopy=False)]  # the frame's rows, in order
    frame["mlflow_run_id"] = [a.get("mlflow_run_id") for a in attrs]
    if any("cohort" in a for a in attrs):
        frame["cohort"] = [a.get("cohort") for a in attrs]
    return frame


def figures(study: optuna.Study) -> dict[str, Figure]:
    """Study figures by file name; a figure Optuna cannot draw yet (too few trials) is left out."""
    from optuna.visualization import matplotlib as vis

    makers = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study),
        # PED-ANOVA, not the default fANOVA: its random forest took 2 s (import and fit) of a 30 s study.
        "param_importances.png": lambda: vis.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()),
        "contour_lr_batch_size.png": lambda: vis.plot_contour(study, params=["lr", "batch_size"]),
        "slice.png": lambda: vis.plot_slice(study, params=["lr", "batch_size"]),
        "intermediate_values.png": lambda: vis.plot_intermediate_values(study),
        "parallel_coordinate.png": lambda: vis.plot_parallel_coordinate(study, params=["lr", "batch_size"]),
        # One bar per trial over wall time, coloured by state: how workers (and cohorts) spent the study.
        "timeline.png": lambda: vis.plot_timeline(study),
    }
    drawn = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        for name, make in makers.items():
            try:
                axes = make()
            except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ complete trials
                optuna.logging.get_logger("cnnexp").warning("figure %s skipped: %s", name, err)
                continue
            drawn[name] = np.ravel(axes)[0].figure
    return drawn


def retrain(config: TuneConfig, params: dict, data: PreparedData) -> tuple[torch.nn.Module, list[dict], BestEpoch, dict]:
    """The best configuration trained again from scratch on train; returns the model (its best epoch's
    weights, as a trial's), history, that epoch and the model's test scores."""
    device = worker_device(config.device, 0)
    state, best = new_training_state(params["lr"], config.seed, device), BestEpoch()

    def on_epoch_end(metrics: dict) -> None:
        tracking.log_epoch(metrics)
        best.update(metrics["epoch"], metrics[OBJECTIVE], state.model)

    history = fit(state, data.splits["train"], data.splits["val"], batch_size=params["batch_size"],
                  epochs=config.epochs, on_epoch_end=on_epoch_end, **speed_options(config))
    test = data.splits["test"]
    model = best.restore(state.model)
    scores = score(predict(model, to_inputs(test.images.to(device))), test.labels.to(device))
    return model, history, best, scores
