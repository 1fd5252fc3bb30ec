"""The study: its storage, sampler and pruner, and the settings it keeps for every worker (search space: space.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

from cnnexp.checks import first_line
from cnnexp.config import ConfigError, TuneConfig, WorkerConfig
from cnnexp.locks import LockHeld, held_alone, sqlite_creation_lock, sqlite_file
from cnnexp.ranking import JUDGED_BY
from cnnexp.verbosity import verbose
from cnnexp.tracking.store import redact_url
from cnnexp.tuning.recovery import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, FailStaleRunAndRetry
from cnnexp.tuning.space import search_space

OBJECTIVE = JUDGED_BY  # a trial's value is its model's, as compare and the champion rule judge it
# What `tune` fixes for the whole study; a joining worker takes these from the study, so no machine drifts.
# A database server's connections are the scarce thing when many workers share it (PostgreSQL allows 100 by
# default, SQLAlchemy's default pool keeps up to 5 idle per engine, and a worker process makes several
# engines). NullPool closes each connection when its query is done: a worker holds one only while it talks
# to the database (docs/scale-out.md has the counts for 8-32 workers, benchmarks/connections.py measures them).
SERVER_ENGINE_KWARGS = {"poolclass": NullPool}
STUDY_SETTINGS = ("epochs", "lr_min", "lr_max", "batch_min", "batch_max", "sampler", "pruner", "objective", "seed",
                  "dataset", "bf16", "torch_compile")


@dataclass(frozen=True)
class Parent:
    """What a worker process needs to log its trials under the study's run."""

    run_id: str
    experiment_id: str
    tracking_uri: str


def quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created ..."), its ExperimentalWarnings and its heartbeat warning
    stay out of a normal run's output; every process that opens a study passes here, spawned workers too."""
    if verbose():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Said at every study.ask() on a storage with heartbeats: cnnexp beats itself (recovery.Heartbeat).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """A plain path is a journal file (multi-process safe, no sqlite locks); a database URL gets heartbeats.

    sqlite is left without them: it is one machine's file, where a dead worker is found by its pid
    (recovery.recover_dead_trials), and a heartbeat thread per worker would only add lock contention.
    """
    quiet_optuna()
    if "://" not in storage:
        if not os.path.isdir(os.path.dirname(storage) or "."):
            raise ConfigError("storage", f"{storage}: directory {os.path.dirname(storage)} does not exist; "
                                         "create it or choose a path in an existing one")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    server = {}
    if has_heartbeats(storage):
        server = dict(heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
                      heartbeat_stale_trial_callback=FailStaleRunAndRetry(), engine_kwargs=dict(SERVER_ENGINE_KWARGS))
    try:
        with warnings.catch_warnings(), sqlite_creation_lock(storage):  # two first calls would both make its tables
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(storage, **server)
    except Exception as err:  # SQLAlchemy and drivers raise many kinds; the user needs the first line
        raise ConfigError("storage", f"cannot open {redact_url(storage)}: {first_line(err)}") from None


@contextlib.contextmanager
def one_call_at_a_time(config: TuneConfig) -> Iterator[None]:
    """Refuses a second `tune` call on a study that another call on this machine is still extending.

    Two calls at once would both take the next call number and parent-run name, and each summary would count
    the other's trials. More processes for one study are what `workers` and `cnnexp worker` are for. The lock
    lies beside a storage file (a journal, sqlite); a database server's study is not guarded this way.
    """
    storage = sqlite_file(config.storage) or (Path(config.storage) if "://" not in config.storage else None)
    if storage is None:
        yield
        return
    try:
        with held_alone(storage.with_name(f"{storage.name}.{zlib.crc32(config.study_name.encode()):08x}.tune.lock")):
            yield
    except LockHeld:
        raise ConfigError("study_name", f"study {config.study_name!r} is being extended by another `cnnexp tune` call "
                                        f"on this machine; wait for it to end, or add processes to it: cnnexp worker "
                                        f"--storage {redact_url(config.storage)} --study-name {config.study_name}") from None


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=config.sampler == "tpe-multivariate")


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
    name_objective(study)
    return study


OBJECTIVE_NAME = "val_accuracy"  # what a trial's value is (its best or last epoch's: the setting `objective`)


def name_objective(study: optuna.Study) -> None:
    """Names the value in Optuna's tools (optuna-dashboard, figures), which otherwise say "Objective 0"."""
    if study.metric_names != [OBJECTIVE_NAME]:  # one write, on the study's first load
        study.set_metric_names([OBJECTIVE_NAME])


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


def record_for_workers(study: optuna.Study, config: TuneConfig, parent: Parent, data_digest: str, call: int) -> int:
    """Records on the study what a joining worker needs; returns its target count (complete or pruned).

    config has the study's settings already (with_study_settings). The latest `tune` (call number `call`)
    owns the parent run that workers log under.
    """
    target = finished_count(study) + config.n_trials
    attrs = {"settings": {name: getattr(config, name) for name in STUDY_SETTINGS}, "data_digest": data_digest,
             "mlflow_parent_run_id": parent.run_id, "mlflow_experiment_id": parent.experiment_id, "target_trials": target,
             "tune_calls": call}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return target


def check_digest(study: optuna.Study, data_digest: str, param: str) -> None:
    expected = study.user_attrs.get("data_digest")
    if expected is not None and expected != data_digest:
        raise ConfigError(param, f"prepared data (digest {data_digest[:12]}) differs from study "
                                 f"{study.study_name!r}'s (digest {expected[:12]}); prepare the same source")


def existing_study(config: TuneConfig | WorkerConfig) -> optuna.Study:
    """The study config names, refused where there is none yet (load_study would create it)."""
    try:
        return optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage))
    except KeyError:
        raise ConfigError("study_name", f"no study {config.study_name!r} in {redact_url(config.storage)}; "
                                        "create it with `cnnexp tune`") from None


def joined(config: WorkerConfig) -> tuple[optuna.Study, TuneConfig]:
    """The study a worker joins, and the tune settings it runs with (the study's, plus this machine's own)."""
    study = existing_study(config)
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


def study_settings(config: TuneConfig) -> dict:
    """Parent-run params: the search space and how it is searched (storage without password)."""
    return {
        "search_space": search_space(config), "sampler": config.sampler, "pruner": config.pruner,
        "storage": redact_url(config.storage), "study_name": config.study_name, "objective": f"maximize {config.objective} epoch's {OBJECTIVE}",
    }
