"""Optuna wiring: the study, the objective (the same `fit` as train, plus callbacks), workers, figures.

The only module that imports optuna. Every trial is an MLflow child run of the study's run; the run's
final status is set before Optuna records the trial's state, from the same outcome:
complete -> FINISHED (once its model is logged, off the training path), pruned -> KILLED (tag
pruned_at_epoch), exception or non-finite loss -> FAILED (tag error).
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import queue
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cnnexp import tracking
from cnnexp.config import TuneConfig
from cnnexp.data import PreparedData, load_prepared
from cnnexp.devices import resolve_device
from cnnexp.evaluate import predict, score
from cnnexp.model import to_inputs
from cnnexp.train import fit, new_training_state

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]
OBJECTIVE = "val_accuracy"


@dataclass(frozen=True)
class Parent:
    """What a worker process needs to log its trials under the study's run."""

    run_id: str
    experiment_id: str
    tracking_uri: str


# --- study -----------------------------------------------------------------------------------

def open_storage(storage: str) -> optuna.storages.BaseStorage | str:
    """A URL goes to Optuna as is; a plain path is a journal file (multi-process safe, no sqlite locks)."""
    if "://" in storage:
        return storage
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))


def redact(storage: str) -> str:
    """The storage URL without its password, fit to log."""
    parts = urlsplit(storage)
    if parts.password is None:
        return storage
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def make_sampler(config: TuneConfig, worker: int) -> optuna.samplers.BaseSampler:
    # Each worker seeds its sampler differently, or parallel workers would propose the same points.
    seed = (config.seed + worker) % 2**32
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.epochs)
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def load_study(config: TuneConfig, worker: int = 0) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(config.storage), study_name=config.study_name, direction="maximize",
        sampler=make_sampler(config, worker), pruner=make_pruner(config), load_if_exists=True,
    )


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
        "storage": redact(config.storage), "study_name": config.study_name, "objective": f"maximize {OBJECTIVE}",
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

    def submit(self, run_id: str, model: torch.nn.Module, example: torch.Tensor, classes: list[str]) -> None:
        self.jobs.put((run_id, copy.deepcopy(model).cpu(), example.cpu(), classes))

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

    def __call__(self, trial: optuna.Trial) -> float:
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
            model, value = self._fit(trial, run_id, params)
        except optuna.TrialPruned as pruned:
            tracking.end_child_run(run_id, "KILLED", {"pruned": "true", "pruned_at_epoch": pruned.args[0]})
            raise
        except BaseException as err:
            tracking.end_child_run(run_id, "FAILED", {tracking.ERROR_TAG: f"{type(err).__name__}: {err}"})
            raise
        example = to_inputs(self.data.splits["val"].images[:4])
        self.models.submit(run_id, model, example, self.data.classes)
        return value

    def _fit(self, trial: optuna.Trial, run_id: str, params: dict) -> tuple[torch.nn.Module, float]:
        def on_epoch_end(metrics: dict) -> None:
            tracking.log_child_epoch(run_id, metrics)
            trial.report(metrics[OBJECTIVE], metrics["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(metrics["epoch"])

        state = new_training_state(params["lr"], self.config.seed, self.device)
        splits = self.data.splits
        history = fit(state, splits["train"], splits["val"], batch_size=params["batch_size"],
                      epochs=self.config.epochs, on_epoch_end=on_epoch_end)
        return state.model, history[-1][OBJECTIVE]


# --- workers ---------------------------------------------------------------------------------

def split_trials(n_trials: int, workers: int) -> list[int]:
    """Each worker runs a fixed share, so the call runs exactly n_trials however the workers race."""
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


def worker_device(name: str, worker: int) -> torch.device:
    """With several GPUs, worker i takes GPU i mod count; an explicit cuda:N is honoured for all."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker % torch.cuda.device_count())
    return device


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_worker(config: TuneConfig, parent: Parent, worker: int, n_trials: int, callbacks: list[TrialCallback]) -> None:
    """One worker's share of the study: load data once, optimize, wait for its models to be logged."""
    # N workers on C cores: C // N threads each, or they oversubscribe the cores and all slow down.
    torch.set_num_threads(max(1, cpu_cores() // config.workers))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_prepared(config.data_dir, config.dataset)
    study = load_study(config, worker)
    models = ModelLogger()
    try:
        study.optimize(
            Objective(config, data, worker_device(config.device, worker), parent, models),
            n_trials=n_trials, timeout=config.timeout or None, catch=(Exception,), callbacks=callbacks,
        )
    finally:
        models.close()


def spawned_worker(config: TuneConfig, parent: Parent, worker: int, n_trials: int,
                   callbacks: list[TrialCallback]) -> None:
    """Entry of a worker process: the parent's store, and SIGTERM (how `mlflow run` stops) as Ctrl-C,
    so the running trial ends FAILED in both stores instead of staying RUNNING."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tracking.use_tracking_uri(parent.tracking_uri)
    run_worker(config, parent, worker, n_trials, callbacks)


def run_workers(config: TuneConfig, parent: Parent, callbacks: list[TrialCallback]) -> None:
    """Worker 0 runs here; the others are spawned processes on the same storage and parent run."""
    shares = split_trials(config.n_trials, config.workers)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    others = [
        context.Process(target=spawned_worker, args=(config, parent, i, shares[i], callbacks), name=f"tune-worker-{i}")
        for i in range(1, config.workers) if shares[i]
    ]
    for process in others:
        process.start()
    try:
        run_worker(config, parent, 0, shares[0], callbacks)
    finally:
        for process in others:
            process.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in others if p.exitcode != 0]
    if failed:
        orphans = fail_orphans(load_study(config), parent)
        raise RuntimeError(f"worker processes ended abnormally: {', '.join(failed)}; "
                           f"trials they left running, now FAILED: {orphans or 'none'}")


def fail_orphans(study: optuna.Study, parent: Parent) -> list[int]:
    """Trials of this call left RUNNING by a dead worker: FAILED in both stores, so the two still agree.

    Only this parent run's trials: another machine may be running trials of the same study right now.
    """
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("mlflow_parent_run_id") == parent.run_id]
    for trial in orphans:
        tracking.end_child_run(trial.user_attrs["mlflow_run_id"], "FAILED",
                               {tracking.ERROR_TAG: "its worker process ended abnormally"})
        study.tell(trial.number, state=TrialState.FAIL)
    return [t.number for t in orphans]


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


def figures(study: optuna.Study) -> dict[str, "matplotlib.figure.Figure"]:
    """Study figures by file name; a figure Optuna cannot draw yet (too few trials) is left out."""
    from optuna.visualization import matplotlib as vis

    makers = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study),
        "param_importances.png": lambda: vis.plot_param_importances(study),
        "contour_lr_batch_size.png": lambda: vis.plot_contour(study, params=["lr", "batch_size"]),
        "slice.png": lambda: vis.plot_slice(study, params=["lr", "batch_size"]),
        "intermediate_values.png": lambda: vis.plot_intermediate_values(study),
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


def retrain(config: TuneConfig, params: dict, data: PreparedData) -> tuple[torch.nn.Module, list[dict], dict]:
    """The best configuration trained again from scratch on train; returns model, history, test scores."""
    device = worker_device(config.device, 0)
    state = new_training_state(params["lr"], config.seed, device)
    history = fit(state, data.splits["train"], data.splits["val"], batch_size=params["batch_size"],
                  epochs=config.epochs, on_epoch_end=tracking.log_epoch)
    test = data.splits["test"]
    scores = score(predict(state.model, to_inputs(test.images.to(device))), test.labels.to(device))
    return state.model, history, scores
