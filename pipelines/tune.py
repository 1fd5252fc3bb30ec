"""mlflow run . -e tune: an Optuna study of lr and batch size; the study is this run, each trial a child run."""
from __future__ import annotations

import dataclasses
import sys

from cnnexp import tracking, tuning
from cnnexp.config import TuneConfig
from cnnexp.model import to_inputs
from pipelines.common import make_parser, run_entry_point
from pipelines.train import load_or_prepare


def progress_line(study, trial) -> None:
    """One line per finished trial, printed by whichever worker ran it (an Optuna callback)."""
    params = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    reported = trial.intermediate_values  # a pruned trial shows its last reported val accuracy
    value = trial.value if trial.value is not None else reported.get(max(reported, default=0))
    shown = "-" if value is None else f"{value:.4f}"
    try:
        best_trial = study.best_trial  # one read: other workers finish trials meanwhile
        best = f"{best_trial.value:.4f} (trial {best_trial.number})"
    except ValueError:  # no complete trial yet
        best = "-"
    state = trial.state.name + (f" at epoch {max(reported)}" if trial.state.name == "PRUNED" and reported else "")
    print(f"trial {trial.number:>3}  {params}  val_acc {shown}  {state}  best {best}", flush=True)


def log_study_settings(config: TuneConfig) -> None:
    # Logged here rather than by log_config: the storage must go without its password.
    settings = tuning.study_settings(config)
    tracking.log_config(dataclasses.replace(config, storage=settings["storage"]))
    tracking.log_params({k: v for k, v in settings.items() if k not in ("storage", "sampler", "pruner", "study_name")})
    tracking.log_dict(settings, "study.json")


def log_outcome(study) -> dict:
    """The study's summary, counts and figures on the active (parent) run."""
    result = tuning.summary(study)
    tracking.set_tags({STUDY_STATUS_TAG: "complete"})
    tracking.log_metrics({k: v for k, v in result.items() if k.startswith("trials_") or k == "best_value"})
    if "best_params" in result:
        tracking.log_params({f"best_{k}": v for k, v in result["best_params"].items()} | {"best_trial": result["best_trial"]})
    tracking.log_dict(result, "summary.json")
    log_trials_table(study, result)
    for name, fig in tuning.figures(study).items():
        tracking.log_figure(fig, name)
    return result


def log_trials_table(study, result: dict) -> None:
    """trials.csv: one row per trial with its MLflow run and model; the best trial's model id as a tag."""
    trials = tuning.trials_table(study)
    trials["mlflow_model_id"] = [tracking.model_id_of(run_id) if run_id else None for run_id in trials["mlflow_run_id"]]
    tracking.log_csv(trials, "trials.csv")
    if "best_trial" in result:
        best_model_id = trials.loc[trials["number"] == result["best_trial"], "mlflow_model_id"].iloc[0]
        if best_model_id:
            tracking.set_tags({"best_model_id": best_model_id})


def retrain_best(config: TuneConfig, params: dict, data) -> dict:
    """Best configuration, trained again in a child run: its model and its test score."""
    with tracking.tracked_run(run_name="best-retrained", nested=True) as run:
        tracking.log_params({**params, "epochs": config.epochs, "seed": config.seed})
        model, history, best, scores = tuning.retrain(config, params, data)
        tracking.log_learning_curves(history)
        info = tracking.log_kept_model(model, to_inputs(data.splits["val"].images[:4]), data.classes, best.epoch,
                                       best.summary(), tracking.split_dataset(data, "val"))
        tracking.log_metrics({"test_accuracy": scores["accuracy"], "test_loss": scores["loss"]},
                             model_id=info.model_id, dataset=tracking.split_dataset(data, "test"))
        tracking.flush()
    print(f"best configuration trained again: run {run.info.run_id}, test_accuracy {scores['accuracy']:.4f}")
    return scores


STUDY_STATUS_TAG = "study_status"


def summarise_on_parent(study, parent_run_id: str) -> None:
    """A worker that sees the study reach its target writes the summary `tune --workers 0` could not."""
    with tracking.tracked_run(run_id=parent_run_id, nested=False):
        log_outcome(study)


def main(config: TuneConfig) -> dict:
    # Everything that can refuse the call does so before its run starts: no FAILED run is left behind.
    config.validate()
    tuning.worker_device(config.device, 0)  # an unavailable device
    config, kept = settled(config)  # a storage that cannot be opened, a setting that differs from the study's
    study = tuning.load_study(config)
    data = load_or_prepare(config)
    tuning.check_digest(study, data.digest, "data_dir")  # other data than the study's
    with tracking.tracked_run(run_name=f"tune-{config.study_name}"):
        log_study_settings(config)
        if kept:  # under `mlflow run` the params hold the defaults it passed; this says what ran
            tracking.set_tags({"settings_from_study": kept})
        before = len(study.trials)
        run_id, experiment_id = tracking.active_run_ids()
        parent = tuning.Parent(run_id, experiment_id, tracking.tracking_uri())
        target = tuning.register(study, config, parent, data.digest)
        if not config.workers:
            tracking.set_tags({STUDY_STATUS_TAG: "waiting for workers"})
            print(f"study {config.study_name!r} ready for {target} complete or pruned trials; on each machine run: "
                  f"cnnexp worker --storage {tracking.redact_url(config.storage)} --study-name {config.study_name}")
        else:
            print(f"study {config.study_name!r}: {before} earlier trials; running {config.n_trials} more "
                  f"on {config.workers} worker(s)")
            tuning.run_workers(config, parent, [progress_line])
            result = log_outcome(study)
            if config.retrain_best and "best_params" in result:
                scores = retrain_best(config, result["best_params"], data)
                tracking.log_metrics({"best_test_accuracy": scores["accuracy"]})
    if not config.workers:
        # The parent stays open until the worker that sees the study reach its target summarises it
        # (under `mlflow run`, which ends it once this process exits, it shows study_status instead).
        tracking.reopen(run_id)
        return {"target_trials": target}
    print(f"done: {summary_line(result)} with {result.get('best_params')}")
    return result


def settled(config: TuneConfig) -> tuple[TuneConfig, str]:
    """config with the settings of the study it extends, and which ones it took from the study."""
    resolved = tuning.with_study_settings(config)
    taken = [f"{name}={getattr(resolved, name)!r}" for name in tuning.STUDY_SETTINGS
             if getattr(resolved, name) != getattr(config, name)]
    if taken:
        print(f"study {config.study_name!r} keeps its settings: {', '.join(taken)}")
    return resolved, ", ".join(taken)


def summary_line(result: dict) -> str:
    return (f"{result['trials_complete']} complete, {result['trials_pruned']} pruned, {result['trials_failed']} failed; "
            f"best val_accuracy {result.get('best_value', float('nan')):.4f}")


def cli(argv: list[str] | None = None, prog: str = "tune") -> int:
    return run_entry_point(make_parser(prog, __doc__, TuneConfig), TuneConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
