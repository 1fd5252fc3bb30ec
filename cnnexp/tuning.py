"""Optuna wiring: the study, the objective (the same `fit` as train, plus callbacks), workers, figures.

The only module that imports optuna. Every trial is an MLflow child run of the study's run; the run's
final status is set before Optuna records the trial's state, from the same outcome:
complete -> FINISHED (once its model is logged, off the training path), pruned -> KILLED (tag
pruned_at_epoch), exception or non-finite loss -> FAILED (tag error).
"""
from __future__ import annotations

import copy
import math
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from cnnexp import tracking
from cnnexp.config import ConfigError, TuneConfig, WorkerConfig, first_line
from cnnexp.data import PreparedData, load_prepared
from cnnexp.devices import resolve_device
from cnnexp.evaluate import predict, score
from cnnexp.model import to_inputs
from cnnexp.train import BestEpoch, fit, new_training_state, speed_options

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

def open_storage(storage: str) -> optuna.storages.BaseStorage | str:
    """A plain path is a journal file (multi-process safe, no sqlite locks); a database URL gets heartbeats.

    sqlite is left without them: it is one machine's file, where a dead worker is found by its pid
    (recover_dead_trials), and a heartbeat thread per worker would only add lock contention.
    """
    if "://" not in storage:
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


def make_sampler(config: TuneConfig, worker: int) -> optuna.samplers.BaseSampler:
    # Each worker seeds its sampler differently, or parallel workers would propose the same points.
    seed = (config.seed + worker) % 2**32
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "asha":
        # The default: replayed over 8 studies on the real sample it saved 46-66% of the epochs (median
        # 32% for the median pruner, which can prune none of its first 5 trials), losing the best trial
        # on the same one study as median did (benchmarks/pruner_replay.py, README Performance).
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.epochs)
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    # fit reports epochs from 1, so a trial can be pruned after its first epoch once 5 trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=5)


def load_study(config: TuneConfig | WorkerConfig, worker: int = 0) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(config.storage), study_name=config.study_name, direction="maximize",
        sampler=make_sampler(config, worker), pruner=make_pruner(config), load_if_exists=True,
    )


def register(study: optuna.Study, config: TuneConfig, parent: Parent, data_digest: str) -> int:
    """Records on the study what a joining worker needs; returns its trial count (complete or pruned).

    A study keeps the settings and data it was created with: a second `tune` that differs is refused,
    naming the parameter. The latest `tune` owns the parent run that workers log under.
    """
    stored = study.user_attrs.get("settings", {})
    for name, value in stored.items():
        if getattr(config, name) != value:
            raise ConfigError(name, f"study {config.study_name!r} was created with {name}={value!r}, got {getattr(config, name)!r}"
                                    " (use a new study_name to change it)")
    check_digest(study, data_digest, "data_dir")
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
    local = {name: getattr(config, name) for name in ("storage", "study_name", "timeout", "workers", "device", "data_dir", "source")}
    return study, TuneConfig(**study.user_attrs["settings"], **local, n_trials=max(config.n_trials, 1))


def joining_offset() -> int:
    """A sampler-seed offset that differs between joining processes on any machines (host and pid)."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


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


# --- objective -------------------------------------------------------------------------------

class ModelLogger:
    """Logs each complete trial's model on a background thread, so the next trial starts at once.

    Measured here: 0.3-0.6 s per model (2.4 s for the first), against 4.5-13 s for a 5-epoch trial on
    the mini data; with a GPU training the gap is bigger. The run stays RUNNING until its model is in,
    then ends FINISHED; close() waits for all of them, so no worker exits with a run still open.
    """

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="model-logger", daemon=True)
        self.thread.start()

    def submit(self, run_id: str, model: torch.nn.Module, example: torch.Tensor, classes: list[str], epoch: int,
               summary: dict[str, float], val) -> None:
        """Arguments as for tracking.log_model_and_finish; the model is copied, so training may go on."""
        self.jobs.put((run_id, copy.deepcopy(model).cpu(), example.cpu(), classes, epoch, summary, val))

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            tracking.log_model_and_finish(*job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def run_name(trial: optuna.Trial, params: dict) -> str:
    return f"trial-{trial.number}-lr{params['lr']:.3g}-bs{params['batch_size']}"


class Objective:
    """One trial: a child run, `fit` with a reporting callback, and a run status that matches Optuna's."""

    def __init__(self, config: TuneConfig, data: PreparedData, device: torch.device, parent: Parent,
                 models: ModelLogger):
        self.config, self.data, self.device, self.parent, self.models = config, data, device, parent, models
        self.val = tracking.split_dataset(data, "val")

    def __call__(self, trial: optuna.Trial) -> float:
        # Who runs it: a trial whose process is gone can then be told from one still running elsewhere.
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        params = suggest(trial, self.config)
        run_id = tracking.start_child_run(
            self.parent.run_id, self.parent.experiment_id, run_name(trial, params),
            {**params, "epochs": self.config.epochs, "seed": self.config.seed},
            {"optuna.trial_number": str(trial.number), "optuna.study_name": self.config.study_name,
             "device": str(self.device)},
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("mlflow_parent_run_id", self.parent.run_id)
        try:
            model, best = self._fit(trial, run_id, params)
        except optuna.TrialPruned as pruned:
            tracking.end_child_run(run_id, "KILLED", {"pruned": "true", "pruned_at_epoch": pruned.args[0]})
            raise
        except BaseException as err:
            tracking.end_child_run(run_id, "FAILED", {tracking.ERROR_TAG: tracking.error_text(err)})
            raise
        example = to_inputs(self.data.splits["val"].images[:4])
        self.models.submit(run_id, model, example, self.data.classes, best.epoch, best.summary(), self.val)
        return best.val_accuracy  # the trial's value is its model's: the best epoch's

    def _fit(self, trial: optuna.Trial, run_id: str, params: dict) -> tuple[torch.nn.Module, BestEpoch]:
        """The trained model, holding its best epoch's weights, and that epoch."""
        best = BestEpoch()

        def on_epoch_end(metrics: dict) -> None:
            tracking.log_child_epoch(run_id, metrics)
            best.update(metrics["epoch"], metrics[OBJECTIVE], state.model)
            trial.report(metrics[OBJECTIVE], metrics["epoch"])
            # After the last epoch pruning saves nothing and would only discard a finished result
            # (successive halving has a rung at epoch 3, the end of a 3-epoch study).
            if metrics["epoch"] < self.config.epochs and trial.should_prune():
                raise optuna.TrialPruned(metrics["epoch"])

        state = new_training_state(params["lr"], self.config.seed, self.device)
        splits = self.data.splits
        fit(state, splits["train"], splits["val"], batch_size=params["batch_size"], epochs=self.config.epochs,
            on_epoch_end=on_epoch_end, **speed_options(self.config))
        return best.restore(state.model), best


# --- workers ---------------------------------------------------------------------------------

class TrialBudget:
    """The trials this call may still start, shared by its local worker processes: each claims one before
    starting it, so the call runs exactly n_trials, and a worker that started late (a spawned process
    imports for seconds) or drew short trials (pruned, large batches) takes more of them."""

    def __init__(self, context: multiprocessing.context.BaseContext, n_trials: int):
        self.remaining = context.Value("i", n_trials)

    def claim(self) -> bool:
        with self.remaining.get_lock():
            if self.remaining.value <= 0:
                return False
            self.remaining.value -= 1
            return True


def worker_device(name: str, worker: int) -> torch.device:
    """With several GPUs, worker i takes GPU i mod count; an explicit cuda:N is honoured for all."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_worker(config: TuneConfig, parent: Parent, worker: int, budget: TrialBudget, callbacks: list[TrialCallback],
               target: int | None = None, sampler_offset: int = 0) -> None:
    """Trials while the call's budget lasts, or (with a target) until the study has `target` complete
    or pruned ones. Loads data once and waits for its models to be logged."""
    # N workers on C cores: C // N threads each, or they oversubscribe the cores and all slow down.
    torch.set_num_threads(max(1, cpu_cores() // max(config.workers, 1)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_prepared(config.data_dir, config.dataset)
    study = load_study(config, worker + sampler_offset)
    models = ModelLogger()
    objective = Objective(config, data, worker_device(config.device, worker), parent, models)
    try:
        if target is None:
            deadline = time.monotonic() + config.timeout if config.timeout else math.inf
            while time.monotonic() < deadline and budget.claim():
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)
        else:
            optimize_until(study, objective, target, config, callbacks)
    finally:
        models.close()


def optimize_until(study: optuna.Study, objective: Objective, target: int, config: TuneConfig,
                   callbacks: list[TrialCallback]) -> None:
    """Trials until the study has `target` complete or pruned ones, however many machines take part.

    A trial running elsewhere counts as on its way; the worker waits for it rather than leaving, since
    if that worker died, its trial is failed and re-queued (heartbeat or pid check) and someone must run
    the retry, even when the others have reached the target meanwhile: nothing is left WAITING.
    A worker never runs more than `target` trials itself (a study that only fails must end).
    """
    deadline = time.monotonic() + config.timeout if config.timeout else math.inf
    for _ in range(target):
        while time.monotonic() < deadline:
            states = Counter(t.state for t in study.get_trials(deepcopy=False))
            finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
            if states[TrialState.WAITING]:
                break  # a retried trial: Optuna runs waiting trials first
            if finished >= target:
                return
            if finished + states[TrialState.RUNNING] < target:
                break
            if has_heartbeats(config.storage):
                optuna.storages.fail_stale_trials(study)
            else:
                recover_dead_trials(study)
            time.sleep(WAIT_POLL_S)
        else:
            return
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)


def spawned_worker(config: TuneConfig, parent: Parent, worker: int, budget: TrialBudget,
                   callbacks: list[TrialCallback], target: int | None, sampler_offset: int) -> None:
    """Entry of a worker process: the parent's store, and SIGTERM (how `mlflow run` stops) as Ctrl-C,
    so the running trial ends FAILED in both stores instead of staying RUNNING."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tracking.use_tracking_uri(parent.tracking_uri)
    run_worker(config, parent, worker, budget, callbacks, target, sampler_offset)


def run_workers(config: TuneConfig, parent: Parent, callbacks: list[TrialCallback], target: int | None = None,
                sampler_offset: int = 0) -> None:
    """Worker 0 runs here; the others are spawned processes on the same storage and parent run.

    Worker i seeds its sampler with seed + sampler_offset + i: joining workers on other machines pass
    an offset of their own (joining_offset), or every machine's worker 0 would propose the same points.

    First, trials that a dead worker of this machine left RUNNING are failed and queued again (on a
    storage with heartbeats, Optuna does that itself, for every machine).
    """
    if not has_heartbeats(config.storage):
        recover_dead_trials(load_study(config))
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    budget = TrialBudget(context, config.n_trials)
    # No process is spawned for a worker that could not get a trial anyway.
    others = [
        context.Process(target=spawned_worker, args=(config, parent, i, budget, callbacks, target, sampler_offset),
                        name=f"tune-worker-{i}")
        for i in range(1, config.workers) if i < config.n_trials or target is not None
    ]
    for process in others:
        process.start()
    try:
        run_worker(config, parent, 0, budget, callbacks, target, sampler_offset)
    finally:
        for process in others:
            process.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in others if p.exitcode != 0]
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
        for key in ("mlflow_run_id", "worker"):
            trial.user_attrs.pop(key, None)
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
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
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
        "param_importances.png": lambda: vis.plot_param_importances(study),
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
