"""cnnexp worker: join a study that `tune` created, on this or any machine, and run its trials.

Everything that defines the study (search space, epochs, seed, dataset, data digest) comes from the study
itself; each trial is an MLflow child run of the study's parent run (MLFLOW_TRACKING_URI must name the
same tracking server). Start the same command on every machine.
"""
from __future__ import annotations

import sys

from cnnexp import tracking, tuning
from cnnexp.config import ConfigError, WorkerConfig
from pipelines.common import make_parser, run_entry_point
from pipelines.train import load_or_prepare
from pipelines.tune import STUDY_STATUS_TAG, progress_line, summarise_on_parent, summary_line


def main(config: WorkerConfig) -> dict:
    config.validate()
    study, settings = tuning.joined(config)
    tuning.worker_device(config.device, 0)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    if not tracking.run_exists(parent_id):
        raise ConfigError("study_name", f"the study's MLflow run {parent_id} is not in {tracking.tracking_uri()}; "
                                        "set MLFLOW_TRACKING_URI to the study's tracking server")
    data = load_or_prepare(settings)
    tuning.check_digest(study, data.digest, "source")
    parent = tuning.Parent(parent_id, study.user_attrs["mlflow_experiment_id"], tracking.tracking_uri())
    target = None if config.n_trials else study.user_attrs["target_trials"]
    goal = f"{config.n_trials} trials" if target is None else f"trials until the study has {target} complete or pruned"
    print(f"joined study {config.study_name!r} ({len(study.trials)} trials so far): {goal}, "
          f"on {config.workers} worker process(es)")
    tuning.run_workers(settings, parent, [progress_line], target, tuning.joining_offset())
    if target is not None and tuning.reached_target(study, target) \
            and tracking.run_tags(parent_id).get(STUDY_STATUS_TAG) == "waiting for workers":
        summarise_on_parent(study, parent_id)
    result = tuning.summary(study)
    print(f"study now: {summary_line(result)}")
    return result


def cli(argv: list[str] | None = None, prog: str = "worker") -> int:
    return run_entry_point(make_parser(prog, __doc__, WorkerConfig), WorkerConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
