"""mlflow run . -e tune: an Optuna study of lr and batch size; the study is this run, each trial a child run."""
from __future__ import annotations

import sys

from cnnexp.config import ConfigError, EvaluateConfig, TrainConfig, TuneConfig
from cnnexp.data import PreparedData, naming_held
from cnnexp.tracking import tags
from cnnexp.tracking.log import data_tags, log_metrics
from cnnexp.tracking.runs import active_run_ids, reopen, set_tags, tracked_run
from cnnexp.tracking.store import redact_url, tracking_uri
from cnnexp.tuning import counts, recovery, report, study, workers
from pipelines import cli as commands
from pipelines import status
from pipelines.outcomes import print_trial
from pipelines.prepared import load_or_prepare
from pipelines.running import Made


def main(config: TuneConfig) -> Made[dict]:
    # Everything that can refuse the call does so before its run starts: no FAILED run is left behind.
    config.validate()
    workers.worker_device(config.device, 0)  # an unavailable device
    config, kept = settled(config)  # a storage that cannot be opened, a setting that differs from the study's
    with study.one_call_at_a_time(config):  # another call extending the study on this machine
        return retrain_only(config) if config.n_trials == 0 else extend(config, kept)


def extend(config: TuneConfig, kept: str) -> Made[dict]:
    """The call itself, once nothing else is extending the study: its parent run, its trials, its summary."""
    found = study.load_study(config)
    recover_dead_call(found, config.storage)
    data = load_or_prepare(config)
    study.check_digest(found, data.digest, "data_dir")  # other data than the study's
    named = naming_held(config, data)  # the sample, where it stood in: in params and the study's settings
    call, previous = counts.call_number(found), found.user_attrs.get("mlflow_parent_run_id")
    # Each call its own parent (under `mlflow run` it must be), named and tagged as which call it is.
    with tracked_run(run_name=f"tune-{config.study_name}" + (f"-resume-{call - 1}" if call > 1 else "")):
        report.log_study_settings(named)
        # The data read, as a train run says it: under `mlflow run` the param dataset keeps what -P passed.
        set_tags({tags.STUDY_CALL: str(call), **data_tags(data),
                  **({tags.PREVIOUS_CALL_RUN_ID: previous} if previous else {})})
        if kept:  # under `mlflow run` the params hold the defaults it passed; this says what ran
            set_tags({tags.SETTINGS_FROM_STUDY: kept})
        plan = counts.plan(found, config.n_trials)
        run_id, experiment_id = active_run_ids()
        parent = study.Parent(run_id, experiment_id, tracking_uri())
        target = study.record_for_workers(found, named, parent, data.digest, call)
        if not config.workers:
            set_tags({tags.STUDY_STATUS: tags.STUDY_WAITING})
            print(f"study {config.study_name!r} ready for {target} complete or pruned trials; on each machine run: "
                  f"cnnexp worker --storage {redact_url(config.storage)} --study-name {config.study_name}")
        else:
            print(f"study {config.study_name!r}, call {call}: {counts.earlier_text(plan)}; {counts.running_text(plan)} "
                  f"{workers.plan_text(config, None)}")
            callbacks = [print_trial]
            if config.workers > 1:  # this process only waits for its workers: the import has a core to itself
                report.import_figures_in_background()
            else:
                callbacks.append(report.import_figures_after_first_trial())
            with status.of_study(found, config.n_trials, config.epochs):
                workers.run_workers(config, parent, callbacks, data=data)
            result = report.log_outcome(found)
            if config.retrain_best and "best_params" in result:
                result["best_test_accuracy"] = retrain_best(config, result["best_params"], data)
                log_metrics({"best_test_accuracy": result["best_test_accuracy"]})
    if not config.workers:
        # The parent stays open until the worker that sees the study reach its target summarises it
        # (under `mlflow run`, which ends it once this process exits, it shows study_status instead).
        reopen(run_id)
        return Made(run_id, {"target_trials": target})
    # The counts are the study's: after a first call, say so, or they read as this call's alone.
    over = "" if call == 1 else f", the study over its {call} calls"
    print(f"done{over}: {report.summary_line(result)} with {result.get('best_params')}")
    return Made(run_id, result)


def retrain_only(config: TuneConfig) -> Made[dict]:
    """n_trials 0 with retrain_best: the existing study's best trained again and scored, under a parent run of its
    own; no trial runs, and the study's calls are not counted on."""
    found = study.existing_study(config)
    result = report.summary(found)
    if "best_params" not in result:
        raise ConfigError("n_trials", f"study {config.study_name!r} has no complete trial to retrain; run some first")
    data = load_or_prepare(config)
    study.check_digest(found, data.digest, "data_dir")
    with tracked_run(run_name=f"tune-{config.study_name}-retrain-best") as run:
        report.log_study_settings(naming_held(config, data))
        set_tags(data_tags(data))
        result["best_test_accuracy"] = retrain_best(config, result["best_params"], data)
        log_metrics({"best_test_accuracy": result["best_test_accuracy"]})
    return Made(run.info.run_id, result)


def recover_dead_call(found, storage: str) -> None:
    """What a killed call left RUNNING on this host, ended as what it is before this call counts the study's
    trials: its trials FAILED and queued again (not "running elsewhere"), its parent run FAILED. (Trials with
    heartbeats are Optuna's to end, once their grace period has passed.)"""
    if not study.has_heartbeats(storage):
        recovery.recover_dead_trials(found)
    ended = recovery.end_dead_parent(found)
    if ended:
        print(f"the study's last call (run {ended}) had died; its run is marked FAILED")


def retrain_best(config: TuneConfig, params: dict, data: PreparedData) -> float:
    """The best configuration trained again and scored on test, as `main` does it: the train and evaluate
    steps, as child runs of the study's run. Returns the test accuracy."""
    from pipelines import evaluate, train  # run as steps, only when asked for

    trained = train.main(TrainConfig(lr=params["lr"], batch_size=params["batch_size"], epochs=config.epochs,
                                     seed=config.seed, device=config.device, data_dir=config.data_dir,
                                     dataset=config.dataset, bf16=config.bf16, torch_compile=config.torch_compile),
                         data=data)
    scored = evaluate.main(EvaluateConfig(model_uri=trained.run_id, data_dir=config.data_dir, dataset=config.dataset,
                                          device=config.device), data=data)
    accuracy = scored.result["test_accuracy"]
    print(f"best configuration trained again: run {trained.run_id}, test_accuracy {accuracy:.4f}")
    return accuracy


def settled(config: TuneConfig) -> tuple[TuneConfig, str]:
    """config with the settings of the study it extends, and which ones it took from the study."""
    resolved = study.with_study_settings(config)
    taken = [f"{name}={getattr(resolved, name)!r}" for name in study.STUDY_SETTINGS
             if getattr(resolved, name) != getattr(config, name)]
    if taken:
        print(f"study {config.study_name!r} keeps its settings: {', '.join(taken)}")
    return resolved, ", ".join(taken)


def cli(argv: list[str] | None = None, prog: str = "tune") -> int:
    return commands.run("tune", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
