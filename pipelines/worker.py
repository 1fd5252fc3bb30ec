"""cnnexp worker: join a study that `tune` created, on this or any machine, and run its trials.

Everything that defines the study (search space, epochs, seed, dataset, data digest) comes from the study
itself; each trial is an MLflow child run of the study's parent run (MLFLOW_TRACKING_URI must name the
same tracking server). Start the same command on every machine.
"""
from __future__ import annotations

import sys

from cnnexp.config import ConfigError, WorkerConfig
from cnnexp.tracking import tags
from cnnexp.tracking.runs import run_exists, run_tags
from cnnexp.tracking.store import tracking_uri
from cnnexp.tuning import counts, report, study, workers
from pipelines import cli as commands
from pipelines import status
from pipelines.outcomes import print_trial
from pipelines.prepared import load_or_prepare
from pipelines.running import Made


def main(config: WorkerConfig) -> Made[dict]:
    config.validate()
    joined, settings = study.joined(config)
    workers.worker_device(config.device, 0)
    parent_id = joined.user_attrs["mlflow_parent_run_id"]
    if not run_exists(parent_id):
        raise ConfigError("study_name", f"the study's MLflow run {parent_id} is not in {tracking_uri()}; "
                                        "set MLFLOW_TRACKING_URI to the study's tracking server")
    data = load_or_prepare(settings)
    study.check_digest(joined, data.digest, "source")
    parent = study.Parent(parent_id, joined.user_attrs["mlflow_experiment_id"], tracking_uri())
    target = None if config.n_trials else joined.user_attrs["target_trials"]
    goal = f"{config.n_trials} trials" if target is None else f"trials until the study has {target} complete or pruned"
    print(f"joined study {config.study_name!r} ({counts.earlier_text(counts.plan(joined, 0))}): {goal}, "
          f"{workers.plan_text(settings, target)}")
    with status.of_study(joined, config.n_trials or None, settings.epochs):
        workers.run_workers(settings, parent, [print_trial], target, study.joining_offset(), data=data)
    if target is not None and study.reached_target(joined, target) \
            and run_tags(parent_id).get(tags.STUDY_STATUS) == tags.STUDY_WAITING:
        report.summarise_on_parent(joined, parent_id)
    result = report.summary(joined)
    print(f"study now: {report.summary_line(result)}")
    return Made(parent_id, result)


def cli(argv: list[str] | None = None, prog: str = "worker") -> int:
    return commands.run("worker", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
