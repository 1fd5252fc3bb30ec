"""Where trials run: the call's trial budget, each worker's device and threads, and the worker processes."""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter

import optuna
import torch
from optuna.trial import TrialState

from cnnexp.config import DEFAULT_COHORT, TuneConfig
from cnnexp.data import PreparedData, load_prepared
from cnnexp.devices import resolve_device
from cnnexp.tracking.store import quiet_mlflow, use_tracking_uri
from cnnexp.tuning.recovery import GRACE_PERIOD_S, recover_dead_trials
from cnnexp.tuning.study import Parent, has_heartbeats, load_study, quiet_optuna
from cnnexp.tuning.trials import TrialCallback, TrialRunner

WAIT_POLL_S = 5  # how often a worker with nothing to start checks the study again


class TrialBudget:
    """The trials this call may still start, shared by its local worker processes: a worker claims each trial
    just before asking Optuna for it, so the call runs exactly n_trials. Every worker started has a cohort's
    worth (enough to fill its engine) set aside for it: a spawned process imports for seconds, and without
    that the first worker, already running, would take every trial of a short study. After its share, each
    claims from what is left, trial by trial."""

    def __init__(self, context: multiprocessing.context.BaseContext, n_trials: int, first_cohorts: list[int]):
        self.remaining = context.Value("i", n_trials - sum(first_cohorts))
        self.reserved = context.Array("i", first_cohorts)

    def claim(self, worker: int, wanted: int = 1) -> int:
        """Up to `wanted` trials for `worker` (its set-aside share first); 0 when the budget is spent."""
        with self.remaining.get_lock():
            if self.reserved[worker]:
                granted = min(wanted, self.reserved[worker])
                self.reserved[worker] -= granted
                return granted
            granted = max(0, min(wanted, self.remaining.value))
            self.remaining.value -= granted
            return granted


def first_cohorts(n_trials: int, size: int, processes: int) -> list[int]:
    """The share set aside for each of `processes` workers (up to a cohort, `size`), in order, from n_trials."""
    return [max(0, min(size, n_trials - i * size)) for i in range(processes)]


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
               target: int | None = None, sampler_offset: int = 0, data: PreparedData | None = None) -> None:
    """Trials while the call's budget lasts, or (with a target) until the study has `target` complete
    or pruned trials. Waits for its models to be logged. `data`: the caller's, if it has loaded it already."""
    torch.set_num_threads(threads_per_worker(config.workers))
    quiet_optuna()  # --verbose keeps Optuna's per-trial lines, in spawned workers too
    data = data or load_prepared(config.data_dir, config.dataset)
    study = load_study(config, worker + sampler_offset)
    device = worker_device(config.device, worker)
    runner = TrialRunner(study, config, data, device, parent, callbacks)
    size = cohort_size(config, device)
    try:
        if target is None:
            deadline = time.monotonic() + config.timeout if config.timeout else math.inf

            def grant(wanted: int) -> int:
                return budget.claim(worker, wanted) if time.monotonic() < deadline else 0

            # A run ends when the budget or the time is spent, or when an error failed its trials (the study
            # goes on, in a new engine); the last run finds nothing granted before it builds one.
            while runner.run(size, grant):
                pass
        else:
            run_until(study, runner, target, size, config)
    finally:
        runner.close()


def run_until(study: optuna.Study, runner: TrialRunner, target: int, size: int, config: TuneConfig) -> None:
    """Trials until the study has `target` complete or pruned trials, however many machines take part.

    A trial running elsewhere counts as on its way; the worker waits for it rather than leaving, since
    if that worker died, its trial is failed and re-queued (heartbeat or pid check) and someone must run
    the retry, even when the others have reached the target meanwhile: nothing is left WAITING, and on a
    storage with heartbeats nothing RUNNING.
    A worker never starts more than `target` trials itself (a study that only fails must end).
    """
    deadline = time.monotonic() + config.timeout if config.timeout else math.inf
    started = 0

    def grant(wanted: int) -> int:
        """Counted again before each trial is asked: workers deciding at once take no more than it lacks."""
        if started + runner.started >= target or time.monotonic() >= deadline:
            return 0
        return min(wanted, wanted_for_target(study, target))

    while started < target and time.monotonic() < deadline:
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
        if wanted_for_target(study, target):
            started += runner.run(size, grant)
            continue
        # On a storage with heartbeats a trial still RUNNING ends or goes stale within the grace period: wait
        # for it, or a dead worker's trial is left RUNNING once the others have reached the target meanwhile.
        if finished >= target and not (has_heartbeats(config.storage) and states[TrialState.RUNNING]):
            return
        if has_heartbeats(config.storage):
            optuna.storages.fail_stale_trials(study)
        else:
            recover_dead_trials(study)
        time.sleep(WAIT_POLL_S)


def wanted_for_target(study: optuna.Study, target: int) -> int:
    """Trials to start now: the waiting (retried) ones, which must run, or what the target still lacks
    once the complete, pruned and running trials (anywhere) are counted."""
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    lacking = target - states[TrialState.COMPLETE] - states[TrialState.PRUNED] - states[TrialState.RUNNING]
    return max(states[TrialState.WAITING], lacking, 0)


def processes_to_run(config: TuneConfig, size: int, target: int | None) -> int:
    """How many worker processes this call runs (itself included): none that could not get a cohort."""
    if target is not None:
        return max(config.workers, 1)
    return max(1, min(config.workers, math.ceil(config.n_trials / size)))


def plan_text(config: TuneConfig, target: int | None) -> str:
    """How the trials are spread, for the line a call prints: cohort size and processes actually started."""
    size = cohort_size(config, worker_device(config.device, 0))
    processes = processes_to_run(config, size, target)
    fewer = (f" ({config.workers} asked: {config.n_trials} trials fill only {processes} cohort(s))"
             if processes < config.workers else "")
    return f"in cohorts of up to {size} on {processes} worker process(es){fewer}"


def spawned_worker(config: TuneConfig, parent: Parent, worker: int, budget: TrialBudget,
                   callbacks: list[TrialCallback], target: int | None, sampler_offset: int) -> None:
    """Entry of a worker process: the parent's store, and SIGTERM (how `mlflow run` stops) as Ctrl-C,
    so its running trials end KILLED and are queued again instead of staying RUNNING."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    use_tracking_uri(parent.tracking_uri)
    quiet_mlflow()
    try:
        run_worker(config, parent, worker, budget, callbacks, target, sampler_offset)
    except KeyboardInterrupt:
        sys.exit(130)  # the trials are recorded as interrupted; the parent prints the one line


def run_workers(config: TuneConfig, parent: Parent, callbacks: list[TrialCallback], target: int | None = None,
                sampler_offset: int = 0, data: PreparedData | None = None) -> None:
    """Worker 0 runs here (on `data`, where the caller has loaded it); the others are spawned processes on
    the same storage and parent run.

    Worker i seeds its sampler from seed + sampler_offset + i and the study's trial count: joining
    workers on other machines pass an offset of their own (joining_offset), or every machine's worker 0
    would propose the same points.

    First, trials that a dead worker of this machine left RUNNING are failed and queued again (on a
    storage with heartbeats, Optuna does that itself, for every machine).
    """
    if not has_heartbeats(config.storage):
        recover_dead_trials(load_study(config))
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    size = cohort_size(config, worker_device(config.device, 0))
    processes = processes_to_run(config, size, target)
    budget = TrialBudget(context, config.n_trials, first_cohorts(config.n_trials, size, processes))
    others = [
        context.Process(target=spawned_worker, args=(config, parent, i, budget, callbacks, target, sampler_offset),
                        name=f"tune-worker-{i}")
        for i in range(1, processes)
    ]
    for process in others:
        process.start()
    try:
        run_worker(config, parent, 0, budget, callbacks, target, sampler_offset, data)
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
