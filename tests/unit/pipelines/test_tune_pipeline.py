"""The tune entry point in-process: refusals before any run, and the best configuration retrained as steps."""
import mlflow
import pytest
import torch

from cnnexp.tuning import trials
from helpers import (assert_optuna_and_mlflow_agree, client_of, interrupted_after_epoch_1, model_uri, parent_and_children,
                     study_of, write_idx_dir)
from pipelines import tune


def test_a_bad_tune_parameter_is_one_line_exit_2_and_no_store_opened(workdir, capsys):
    (workdir / "mlflow.db").unlink()
    assert tune.cli(["--lr-min", "0.1", "--lr-max", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lr_min: must be below lr_max" in err and "\n" not in err
    assert not (workdir / "mlflow.db").exists()  # no run was started, not even the store opened


def test_retrain_best_runs_the_train_and_evaluate_steps_under_the_study(workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "2", "--epochs", "1", "--pruner", "none", "--retrain-best", "true", "--source", str(source)]
    assert tune.cli(args) == 0
    (parent,), children = parent_and_children(workdir)
    kinds = {r.info.run_name.split("-")[0]: r for r in children[parent.info.run_id]}
    trained, scored = kinds["train"], kinds["evaluate"]
    assert trained.info.status == scored.info.status == "FINISHED"
    assert scored.data.tags["scored_run_id"] == trained.info.run_id
    assert float(trained.data.params["lr"]) == pytest.approx(float(parent.data.params["best_lr"]))
    test_accuracy = client_of(workdir).get_run(trained.info.run_id).data.metrics["test_accuracy"]
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(test_accuracy)
    model = mlflow.pytorch.load_model(model_uri(trained.info.run_id))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_retrain_best_when_the_best_trial_is_a_retry(workdir, tmp_path, monkeypatch):
    real_engine = trials.Engine
    monkeypatch.setattr(trials, "Engine", interrupted_after_epoch_1(real_engine))
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    args = ["--n-trials", "2", "--epochs", "2", "--cohort", "2", "--pruner", "none", "--source", str(source)]
    assert tune.cli(args) == 130
    monkeypatch.setattr(trials, "Engine", real_engine)
    assert tune.cli(args + ["--retrain-best", "true"]) == 0
    study = study_of(workdir)
    assert "retry_of" in study.best_trial.user_attrs  # only the retries completed
    parents, children = parent_and_children(workdir)
    trained = next(r for r in children[parents[-1].info.run_id] if r.info.run_name.startswith("train-"))
    assert float(trained.data.params["lr"]) == pytest.approx(study.best_params["lr"])
    assert "best_test_accuracy" in client_of(workdir).get_run(parents[-1].info.run_id).data.metrics


def test_hyperband_prunes_within_cohorts_and_both_stores_agree(workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    assert tune.cli(["--n-trials", "9", "--epochs", "3", "--cohort", "3", "--pruner", "hyperband", "--sampler", "random",
                     "--source", str(source)]) == 0
    study = study_of(workdir)
    assert len(study.trials) == 9 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    (parent,), children = parent_and_children(workdir)
    assert_optuna_and_mlflow_agree(study, children[parent.info.run_id], client_of(workdir))


def test_a_resume_after_ctrl_c_counts_earlier_requeued_and_new_trials_apart_and_names_its_call(
        workdir, tmp_path, monkeypatch, capsys):
    real_engine = trials.Engine
    monkeypatch.setattr(trials, "Engine", interrupted_after_epoch_1(real_engine))
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    args = ["--epochs", "2", "--cohort", "2", "--pruner", "none", "--source", str(source)]
    assert tune.cli(["--n-trials", "2", *args]) == 130
    monkeypatch.setattr(trials, "Engine", real_engine)
    capsys.readouterr()
    assert tune.cli(["--n-trials", "3", *args]) == 0
    out = capsys.readouterr().out
    assert "study 'cnnexp-tune', call 2: 2 earlier trials (2 stopped and queued again); running 3: 2 queued again, " \
           "then 1 new in cohorts of up to 2" in out
    assert ("done, the study over its 2 calls: 3 complete, 0 pruned, 0 failed, 2 stopped and queued again; "
            "best val_accuracy") in out
    parents, _ = parent_and_children(workdir)
    assert [p.info.run_name for p in parents] == ["tune-cnnexp-tune", "tune-cnnexp-tune-resume-1"]
    assert [p.data.tags["study_call"] for p in parents] == ["1", "2"]
    assert "previous_call_run_id" not in parents[0].data.tags
    assert parents[1].data.tags["previous_call_run_id"] == parents[0].info.run_id
    metrics = parents[1].data.metrics
    assert (metrics["trials_complete"], metrics["trials_failed"], metrics["trials_requeued"], metrics["trials_total"]) \
        == (3, 0, 2, 5)
