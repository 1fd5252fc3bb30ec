"""The tune entry point in-process: refusals before any run, and the best configuration retrained as steps."""
import socket
import subprocess
import sys

import mlflow
import optuna
import pytest
import torch

from cnnexp.config import TuneConfig
from cnnexp.tracking import tags
from cnnexp.tracking.runs import start_child_run
from cnnexp.tuning import study as studies, trials
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


ONE_EPOCH = ["--epochs", "1", "--pruner", "none"]


def test_a_second_call_while_another_extends_the_study_is_refused_pointing_to_worker(workdir, tmp_path, capsys):
    source = ["--source", str(write_idx_dir(tmp_path / "idx", n_train=100, n_test=30))]
    assert tune.cli(["--n-trials", "1", *ONE_EPOCH, *source]) == 0
    with studies.one_call_at_a_time(TuneConfig()):  # what a first call holds while it runs
        assert tune.cli(["--n-trials", "1", *source]) == 2
    line = capsys.readouterr().err.strip()
    assert line == ("tune: error: study_name: study 'cnnexp-tune' is being extended by another `cnnexp tune` call on "
                    "this machine; wait for it to end, or add processes to it: cnnexp worker --storage "
                    "optuna-journal.log --study-name cnnexp-tune")
    assert len(parent_and_children(workdir)[0]) == 1  # no second parent, no second call number
    assert tune.cli(["--n-trials", "1", *source]) == 0  # once that call has ended
    assert [p.data.tags["study_call"] for p in parent_and_children(workdir)[0]] == ["1", "2"]


def _gone_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    return gone.pid


def _killed_call(workdir) -> str:
    """What a SIGKILL of a call leaves: its parent run and a trial RUNNING, owned by a process that is gone.
    Returns the parent's run id."""
    (parent,), _ = parent_and_children(workdir)
    run_id, pid, client = parent.info.run_id, _gone_pid(), client_of(workdir)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, tags.OWNER_PID, str(pid))
    study = study_of(workdir)
    trial = study.ask(fixed_distributions=study.trials[0].distributions)
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": pid})
    trial.set_user_attr("mlflow_run_id", start_child_run(run_id, parent.info.experiment_id, "trial-1", {}, {}))
    return run_id


def test_after_a_killed_call_the_next_names_its_trials_dead_and_ends_its_parent(workdir, tmp_path, capsys):
    source = ["--source", str(write_idx_dir(tmp_path / "idx", n_train=100, n_test=30))]
    assert tune.cli(["--n-trials", "1", *ONE_EPOCH, *source]) == 0
    killed = _killed_call(workdir)
    capsys.readouterr()
    assert tune.cli(["--n-trials", "1", *source]) == 0
    out = capsys.readouterr().out
    assert f"the study's last call (run {killed}) had died; its run is marked FAILED" in out
    assert "call 2: 2 earlier trials (1 complete, 1 stopped and queued again); running 1: 1 queued again" in out
    assert "running elsewhere" not in out
    run = client_of(workdir).get_run(killed)
    assert run.info.status == "FAILED" and "died" in run.data.tags["error"]


def test_n_trials_0_retrains_an_existing_studys_best_without_another_trial(workdir, tmp_path, capsys):
    source = ["--source", str(write_idx_dir(tmp_path / "idx", n_train=100, n_test=30))]
    assert tune.cli(["--n-trials", "0", "--retrain-best", "true", *source]) == 2  # no study yet: none is made
    assert "study_name: no study 'cnnexp-tune'" in capsys.readouterr().err
    assert not optuna.get_all_study_names(studies.open_storage(str(workdir / "optuna-journal.log")))
    assert tune.cli(["--n-trials", "1", *ONE_EPOCH, *source]) == 0
    assert tune.cli(["--n-trials", "0", "--retrain-best", "true", *source]) == 0
    assert len(study_of(workdir).trials) == 1
    parents, children = parent_and_children(workdir)
    assert [p.info.run_name for p in parents] == ["tune-cnnexp-tune", "tune-cnnexp-tune-retrain-best"]
    steps = sorted(r.info.run_name.split("-")[0] for r in children[parents[1].info.run_id])
    assert steps == ["evaluate", "train"] and "best_test_accuracy" in parents[1].data.metrics
