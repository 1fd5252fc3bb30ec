"""tune through `mlflow run` with worker processes: the acceptance run, then a resume with fewer workers."""
import pytest

from helpers import (FIGURES, assert_optuna_and_mlflow_agree, client_of, parent_and_children, run_mlflow, study_of,
                     write_idx_dir)


def test_mlflow_run_tune_four_workers_then_resume_with_two(tmp_path):
    work = tmp_path
    source = write_idx_dir(tmp_path / "idx")
    # `mlflow run` runs in the project directory: the journal (the default kind of storage) goes to tmp.
    common = dict(epochs=3, pruner="hyperband", source=source, data_dir=tmp_path / "data",
                  storage=work / "optuna-journal.log")
    done = run_mlflow("tune", work, n_trials=12, workers=4, **common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stdout + done.stderr
    assert sum(line.startswith("trial ") for line in done.stdout.splitlines()) == 12
    study = study_of(work)
    assert len(study.trials) == 12
    assert any(t.state.name == "PRUNED" for t in study.trials)
    (parent,), children = parent_and_children(work)
    assert parent.info.status == "FINISHED"
    assert_optuna_and_mlflow_agree(study, children[parent.info.run_id], client_of(work))
    artifacts = {a.path for a in client_of(work).list_artifacts(parent.info.run_id)}
    assert FIGURES <= artifacts and "summary.json" in artifacts
    assert parent.data.params["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials_pruned"] == sum(t.state.name == "PRUNED" for t in study.trials)

    # Same storage and study name: the study grows by n_trials, in a new parent run, with 2 workers.
    done = run_mlflow("tune", work, n_trials=4, workers=2, **common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stdout + done.stderr
    study = study_of(work)
    assert len(study.trials) == 16
    parents, children = parent_and_children(work)
    assert len(parents) == 2 and len(children[parents[1].info.run_id]) == 4
    assert_optuna_and_mlflow_agree(study, [run for runs in children.values() for run in runs], client_of(work))


