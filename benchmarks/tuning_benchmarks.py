"""Benchmarks 4 and 5: whole tuning studies through cnnexp.tuning, as `mlflow run . -e tune` runs them.

Loaded by benchmarks/run.py (`pruning(bench)`, `workers(bench)`). Each study gets a fresh journal
storage in a temporary working directory, and MLflow tracking stays on (a sqlite store there, one
parent run per study, a child run and a logged model per trial): the overhead users get is measured.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from benchmarks.harness import fit_epochs, summarise, write_torchvision_root
from cnnexp.tracking.runs import active_run_ids, tracked_run
from cnnexp.tracking.store import tracking_uri, use_tracking_uri
from cnnexp.tuning.report import summary
from cnnexp.tuning.space import suggest
from cnnexp.tuning.study import Parent, load_study
from cnnexp.tuning.workers import cpu_cores, run_workers
from cnnexp.config import PrepareConfig, TuneConfig
from cnnexp.data import Split, prepare

REAL_TRAIN = 3_443  # the real sample's training images: the prepared split is then exactly the mini data's


@dataclass(frozen=True)
class Sizes:
    pruning_train: int  # images written as the training file (10% of them become val)
    pruning_trials: int
    pruning_epochs: int
    workers_train: int
    worker_trials: int
    worker_epochs: int
    worker_repeats: int


# Pruning: the real sample itself (accuracy is the point), TuneConfig's 5 epochs a trial. Workers:
# trials long enough that a spawned worker's start-up (seconds of imports) weighs as in a real study.
FULL = Sizes(pruning_train=REAL_TRAIN, pruning_trials=20, pruning_epochs=5,
             workers_train=12_000, worker_trials=8, worker_epochs=8, worker_repeats=1)
QUICK = Sizes(pruning_train=300, pruning_trials=6, pruning_epochs=2,
              workers_train=300, worker_trials=2, worker_epochs=1, worker_repeats=1)
TEST_IMAGES = 100  # prepare() needs a test file; these benchmarks never score on it


@contextlib.contextmanager
def tuning_workdir(b, n_train: int) -> Iterator[tuple[Path, str]]:
    """A temporary working directory (MLflow writes artifacts under ./mlruns) holding the first n_train
    of run.py's training images, prepared, and a sqlite store; yields (directory, description of the data)."""
    # run.py's train split starts with the real sample's 3,443 training images (when present), then
    # repeats the sample: up to REAL_TRAIN the prepared train/val split is the mini data's own.
    train = Split(b.train.images[:n_train], b.train.labels[:n_train])
    test = Split(b.test.images[:TEST_IMAGES], b.test.labels[:TEST_IMAGES])
    previous_uri = tracking_uri()
    with tempfile.TemporaryDirectory(prefix="cnnexp-tune-bench-") as tmp, contextlib.chdir(tmp):
        source = write_torchvision_root(Path(tmp) / "source", train, test) / "FashionMNIST" / "raw"
        data, _ = prepare(PrepareConfig(source=str(source), data_dir=str(Path(tmp) / "data")))
        kind = "real" if b.data_kind.startswith("real") else "synthetic"
        kind += "" if kind == "synthetic" or n_train <= REAL_TRAIN else " (tiled)"
        described = f"{kind}: {len(data.splits['train']):,} train / {len(data.splits['val']):,} val images"
        use_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        try:
            yield Path(tmp), described
        finally:
            use_tracking_uri(previous_uri)


def run_study(config: TuneConfig) -> dict:
    """One tuning call as pipelines/tune.py makes it (a parent run, run_workers under it), timed whole:
    worker start-up, trials, the wait for their logged models. Returns the timing and the study."""
    threads = torch.get_num_threads()  # run_worker sets cores // workers threads in this process too
    try:
        with tracked_run(run_name=f"bench-{config.study_name}"):
            run_id, experiment_id = active_run_ids()
            parent = Parent(run_id, experiment_id, tracking_uri())
            started = time.perf_counter()
            run_workers(config, parent, [])
            seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    study = load_study(config)
    trials = study.get_trials(deepcopy=False)
    return {
        "seconds": seconds, "trials_per_min": 60 * len(trials) / seconds,
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "summary": summary(study), "params": [t.params for t in sorted(trials, key=lambda t: t.number)],
    }


def base_config(b, work: Path, name: str, **changes) -> TuneConfig:
    return TuneConfig(storage=str(work / f"{name}.journal"), study_name=name, data_dir=str(work / "data"),
                      device=str(b.device), **changes)


PRUNING_CONTENDERS = ("none", "median", "asha")  # the baseline, the median, tune's default


def pruning(b) -> dict:
    """4. The same 20 trials without pruning, with the median pruner and with tune's default (asha):
    epochs consumed, wall time, best val accuracy. The target is judged on the default.

    "Same trials": the random sampler with one seed proposes the same (lr, batch size) sequence whatever
    the pruner does (it ignores the history; TPE would not), and every trial trains from the same seed.
    """
    sizes = QUICK if b.quick else FULL
    default = TuneConfig().pruner
    with tuning_workdir(b, sizes.pruning_train) as (work, described):
        studies = {}
        for pruner in PRUNING_CONTENDERS:  # one study each: epochs are exact, wall time a single sample
            config = base_config(b, work, f"pruner-{pruner}", pruner=pruner, sampler="random",
                                 n_trials=sizes.pruning_trials, epochs=sizes.pruning_epochs)
            studies[pruner] = run_study(config)
    none = studies["none"]
    pruners = {name: pruning_outcome(study, none) for name, study in studies.items() if name != "none"}
    same = all(study["params"] == none["params"] for study in studies.values())
    notes = [f"data: {described}; same trials in all: {same}"]
    for name, outcome in pruners.items():
        notes.append(
            f"{name}{' (default)' if name == default else ''}: {outcome['epochs_saved_pct']:.0f}% of the epochs saved "
            f"({outcome['trials_pruned']} of {sizes.pruning_trials} trials pruned), wall {none['seconds']:.0f}s -> "
            f"{outcome['study_wall_s']:.0f}s, best val accuracy {none['summary']['best_value']:.4f} -> "
            f"{outcome['best_val_accuracy']:.4f} ({outcome['best_val_accuracy_drop_points']:+.2f} points lost); "
            f"target (>= 40% saved, <= 1 point lost) {'met' if outcome['target_met'] else 'NOT met'}")
    return {
        "unit": "epochs", "rows": summarise({f"pruner {k}": [v] for k, v in studies.items()}, "pruner none", "epochs"),
        "data": described, "same_trials": same, "default_pruner": default,
        "study": f"{sizes.pruning_trials} trials x {sizes.pruning_epochs} epochs, random sampler (seed 0), "
                 f"workers=1, MLflow tracking on",
        "epochs_consumed": {name: study["epochs"] for name, study in studies.items()},
        "unpruned": {"study_wall_s": none["seconds"], "best_val_accuracy": none["summary"]["best_value"]},
        "pruners": pruners, "target_met": pruners[default]["target_met"], "notes": notes,
    }


def pruning_outcome(study: dict, unpruned: dict) -> dict:
    saved = 100 * (1 - study["epochs"] / unpruned["epochs"])
    drop = 100 * (unpruned["summary"]["best_value"] - study["summary"]["best_value"])
    return {
        "epochs_saved_pct": saved, "study_wall_s": study["seconds"],
        "wall_saved_pct": 100 * (1 - study["seconds"] / unpruned["seconds"]),
        "best_val_accuracy": study["summary"]["best_value"], "best_val_accuracy_drop_points": drop,
        "trials_pruned": study["summary"]["trials_pruned"], "target_met": saved >= 40 and drop <= 1,
    }


def worker_startup_s() -> float:
    """Seconds from spawning a process until it could start a trial: interpreter, the parent's __main__
    re-imported as spawn does, then cnnexp.tuning (torch, mlflow, optuna). Loading the prepared data,
    a few milliseconds here, is left out."""
    started = time.perf_counter()
    process = multiprocessing.get_context("spawn").Process(target=importlib.import_module, args=("cnnexp.tuning",))
    process.start()
    process.join()
    return time.perf_counter() - started


def workers(b) -> dict:
    """5. Tuning throughput, workers=1 vs workers=2: trials per minute of the whole call, interleaved.

    Two studies of the same trials in both contenders (no pruning; the 2-worker call includes its
    second process's start-up): "batch 128", where every trial costs the same and torch's threads
    already use every core in one process, and "search space", 8 (lr, batch size) points drawn from
    tune's default space and enqueued alike in both, at tune's 5 epochs a trial, as a study runs them.
    """
    sizes = QUICK if b.quick else FULL
    cores = cpu_cores()
    scenarios = {
        "batch 128": dict(batch_min=128, batch_max=128, epochs=sizes.worker_epochs),
        "search space": dict(epochs=TuneConfig().epochs if not b.quick else sizes.worker_epochs),
    }
    with tuning_workdir(b, sizes.workers_train) as (work, described):
        results = {name: workers_scenario(b, work, name, settings, sizes) for name, settings in scenarios.items()}
        startup = worker_startup_s()
        speedup = thread_speedup(b, cores, sizes.workers_train)
    rows = [row for result in results.values() for row in result.pop("rows")]
    notes = [f"data: {described}; spawned worker start-up {startup:.1f}s; one process at batch 128 runs "
             f"{speedup:.2f}x faster on {cores} threads than on 1, so {cores} one-thread workers can give at most "
             f"{cores / speedup:.2f}x there"]
    for name, result in results.items():
        notes.append(f"{name} ({result['study']}): wall {result['study_wall_s']['workers=1']:.1f}s -> "
                     f"{result['study_wall_s']['workers=2']:.1f}s, {result['ratio']:.2f}x; target (>= 1.6x) "
                     f"{'met' if result['target_met'] else 'NOT met'}")
    return {
        "unit": "trials/min", "rows": rows, "data": described, "scenarios": results, "worker_startup_s": startup,
        "one_process_thread_speedup": {"threads": cores, "batch": 128, "speedup": speedup},
        "threads_per_worker": {"workers=1": cores, "workers=2": max(1, cores // 2)}, "notes": notes,
    }


def workers_scenario(b, work: Path, name: str, settings: dict, sizes: Sizes) -> dict:
    points = fixed_points(TuneConfig(**settings), sizes.worker_trials)
    runs: dict[str, list[dict]] = {f"workers={n} ({name})": [] for n in (1, 2)}
    for repeat in range(sizes.worker_repeats):
        for n in (1, 2):
            config = base_config(b, work, f"workers{n}-{name.replace(' ', '-')}-{repeat}", workers=n, pruner="none",
                                 n_trials=len(points), **settings)
            study = load_study(config)
            for params in points:
                study.enqueue_trial(params)
            runs[f"workers={n} ({name})"].append(run_study(config))
    one, two = (statistics.median(r["seconds"] for r in result) for result in runs.values())
    rows = summarise(runs, f"workers=1 ({name})", "trials_per_min", higher_is_better=True)
    ratio = rows[1]["ratio_vs_baseline"]
    return {
        "rows": rows, "study": f"{len(points)} trials x {settings['epochs']} epochs, batch sizes "
                               f"{sorted({p['batch_size'] for p in points})}, {sizes.worker_repeats} repeat(s)",
        "ratio": ratio, "target_met": ratio >= 1.6, "study_wall_s": {"workers=1": one, "workers=2": two},
    }


def fixed_points(config: TuneConfig, n: int) -> list[dict]:
    """n (lr, batch size) points from the config's search space, the same on every call (seeded)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [suggest(study.ask(), config) for _ in range(n)]


def thread_speedup(b, threads: int, n_images: int) -> float:
    """How much faster one process trains (an epoch at batch 128) on `threads` threads than on one."""
    small = dataclasses.replace(b, train=Split(b.train.images[:n_images], b.train.labels[:n_images]))
    previous = torch.get_num_threads()
    seconds: dict[int, list[float]] = {1: [], threads: []}
    try:
        for n in (1, threads, 1, threads):  # interleaved; the faster of two
            torch.set_num_threads(n)
            seconds[n].append(fit_epochs(small, 128)["seconds"])
    finally:
        torch.set_num_threads(previous)
    return min(seconds[1]) / min(seconds[threads])
