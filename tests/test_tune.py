"""The tune entry point: config checks, Optuna and MLflow agreeing on every trial, workers, resuming."""
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp import tracking, tuning
from cnnexp.config import TuneConfig
from cnnexp.train import NonFiniteLoss
from conftest import write_idx_dir
from pipelines import tune
from test_mlflow_run import mlflow_run

MLFLOW_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
FIGURES = {"optimization_history.png", "param_importances.png", "contour_lr_batch_size.png", "intermediate_values.png",
           "parallel_coordinate.png", "timeline.png"}


def _study(work, name="cnnexp-tune"):
    return optuna.load_study(study_name=name, storage=tuning.open_storage(str(work / "optuna-journal.log")))


def _client(work):
    # Not mlflow.set_tracking_uri: that would outlive the test and send later in-process runs here.
    return MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def _parent_and_children(work):
    runs = _client(work).search_runs(["0"], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return parents, children


def assert_optuna_and_mlflow_agree(study, child_runs, client, killed=None):
    """Every trial has exactly one child run with its params, state and per-epoch values, and no run is extra.

    killed: the number of a trial whose worker was SIGKILLed; an epoch is written to two stores one
    after the other, so a kill between the writes may leave its last epoch in only one of them.
    """
    by_number = {}
    for run in child_runs:
        number = int(run.data.tags["optuna.trial_number"])
        assert number not in by_number, f"trial {number} logged twice"
        by_number[number] = run
    trials = {t.number: t for t in study.trials}
    assert set(by_number) == set(trials)
    for number, trial in trials.items():
        run = by_number[number]
        assert run.info.status == MLFLOW_STATE[trial.state.name], number
        assert run.data.tags.get("mlflow.runName", run.info.run_name).startswith(f"trial-{number}-")
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert int(run.data.params["batch_size"]) == trial.params["batch_size"]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        logged = {m.step: pytest.approx(m.value) for m in history}
        assert len(history) == len(logged), f"trial {number}: an epoch logged twice"
        if number == killed:
            last = max([*logged, *trial.intermediate_values], default=0)
            logged.pop(last, None)
            reported = {step: value for step, value in trial.intermediate_values.items() if step != last}
            assert logged == reported
        else:
            assert logged == trial.intermediate_values
        if trial.state.name == "COMPLETE":
            # The trial's value is its best epoch's, whose weights are its model (MLflow 3: a LoggedModel of the run).
            assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)
            assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
            (model,) = run.outputs.model_outputs
            assert model.step == run.data.metrics["best_epoch"], number
        else:
            assert not run.outputs.model_outputs, number
        if trial.state.name == "PRUNED":
            assert run.data.tags["pruned_at_epoch"] == str(max(trial.intermediate_values))


# --- fast --------------------------------------------------------------------------------

BAD_TUNE_ARGS = {
    "no trials": (["--n-trials", "0"], "n_trials: must be at least 1"),
    "lr range reversed": (["--lr-min", "0.1", "--lr-max", "0.01"], "lr_min: must be below lr_max"),
    "lr zero": (["--lr-min", "0"], "lr_min: must be a positive number"),
    "batch not a power of two": (["--batch-max", "100"], "batch_max: must be a power of two"),
    "batch range reversed": (["--batch-min", "64", "--batch-max", "32"], "batch_min: must not exceed batch_max"),
    "unknown sampler": (["--sampler", "grid"], "sampler: unknown value 'grid'"),
    "unknown pruner": (["--pruner", "sha"], "pruner: unknown value 'sha'"),
    "negative workers": (["--workers", "-1"], "workers: must be 0"),
    "negative timeout": (["--timeout", "-1"], "timeout: must be 0"),
}


@pytest.mark.parametrize("case", BAD_TUNE_ARGS)
def test_bad_tune_parameter_gets_one_line_and_exit_2(case, workdir, capsys):
    args, message = BAD_TUNE_ARGS[case]
    assert tune.cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (workdir / "mlflow.db").exists()  # no run was started, not even the store opened


def test_a_study_is_extended_with_its_own_settings_and_a_differing_one_is_refused_before_any_run(
        workdir, tmp_path, capsys):
    source = ["--source", str(write_idx_dir(tmp_path / "idx", n_train=200, n_test=50))]
    assert tune.cli(["--workers", "0", "--n-trials", "2", "--epochs", "2", "--batch-min", "32", *source]) == 0
    capsys.readouterr()
    assert tune.cli(["--workers", "0", "--n-trials", "1", *source]) == 0
    assert "keeps its settings: epochs=2, batch_min=32" in capsys.readouterr().out
    settings = _study(workdir).user_attrs["settings"]
    assert settings["epochs"] == 2 and settings["batch_min"] == 32
    parents, _ = _parent_and_children(workdir)
    assert parents[-1].data.params["epochs"] == "2"
    assert parents[-1].info.status == "RUNNING"  # --workers 0: open until a worker finishes the study
    assert tune.cli(["--workers", "0", "--n-trials", "1", "--epochs", "3", *source]) == 2
    assert "epochs: study 'cnnexp-tune' was created with epochs=2, got 3 (leave it out" in capsys.readouterr().err
    assert len(_parent_and_children(workdir)[0]) == 2  # the refused call made no run


def test_batch_sizes_are_the_powers_of_two_in_range():
    assert TuneConfig(batch_min=16, batch_max=128).batch_sizes == [16, 32, 64, 128]
    assert TuneConfig(batch_min=8, batch_max=8).batch_sizes == [8]


def _claim_all(budget, claimed):
    claimed.put(sum(iter(budget.claim, False)))


def test_local_workers_claim_exactly_the_budgeted_trials_between_them():
    context = multiprocessing.get_context("fork")  # the lock and counter are what is tested; fork starts fast
    budget, claimed = tuning.TrialBudget(context, 7), context.Queue()
    workers = [context.Process(target=_claim_all, args=(budget, claimed)) for _ in range(3)]
    for worker in workers:
        worker.start()
    counts = [claimed.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join()
    assert sum(counts) == 7 and not budget.claim()


def test_storage_password_never_reaches_the_logs():
    url = "postgresql://tuner:s3cret@db.example:5432/optuna"
    assert "s3cret" not in json.dumps(tuning.study_settings(TuneConfig(storage=url)))


def test_a_plain_path_is_a_journal_and_a_url_goes_to_optuna(tmp_path):
    assert isinstance(tuning.open_storage(str(tmp_path / "j.log")), optuna.storages.JournalStorage)
    assert isinstance(tuning.open_storage(f"sqlite:///{tmp_path / 'x.db'}"), optuna.storages.RDBStorage)


def _diverging_at_batch_16(monkeypatch):
    """fit (a lone trial) and fit_cohort (a cohort's members) diverge wherever the batch size is 16."""
    real_fit, real_fit_cohort = tuning.fit, tuning.fit_cohort

    def fit(state, train, val, *, batch_size, **options):
        if batch_size == 16:
            raise NonFiniteLoss(1, float("nan"))
        return real_fit(state, train, val, batch_size=batch_size, **options)

    def fit_cohort(cohort, train, val, *, on_epoch_end, **options):
        def diverge(results):
            return on_epoch_end({i: NonFiniteLoss(1, float("nan")) if cohort.members[i].batch_size == 16 else r
                                 for i, r in results.items()})
        return real_fit_cohort(cohort, train, val, on_epoch_end=diverge, **options)

    monkeypatch.setattr(tuning, "fit", fit)
    monkeypatch.setattr(tuning, "fit_cohort", fit_cohort)


@pytest.mark.parametrize("cohort", [1, 3])
def test_diverging_trials_fail_in_both_stores_and_the_study_goes_on(cohort, workdir, tmp_path, monkeypatch):
    _diverging_at_batch_16(monkeypatch)
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "6", "--epochs", "2", "--batch-min", "16", "--batch-max", "32", "--cohort", str(cohort),
            "--pruner", "none", "--sampler", "random", "--source", str(source)]
    assert tune.cli(args) == 0
    study = _study(workdir)
    states = [t.state.name for t in study.trials]
    assert "FAIL" in states and "COMPLETE" in states and len(states) == 6
    (parent,), children = _parent_and_children(workdir)
    assert_optuna_and_mlflow_agree(study, children[parent.info.run_id], _client(workdir))
    failed = [r for r in children[parent.info.run_id] if r.info.status == "FAILED"]
    assert all("training loss became nan" in r.data.tags["error"] for r in failed)
    assert {r.data.tags["cohort_size"] for r in children[parent.info.run_id]} == {str(cohort)}
    assert parent.data.metrics["trials_failed"] == states.count("FAIL")
    assert parent.info.status == "FINISHED"
    assert_study_table_and_figures(study, parent, children[parent.info.run_id])


def assert_study_table_and_figures(study, parent, child_runs):
    """The parent's trials.csv names each trial's run and model; the best trial's model is a tag."""
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "parallel_coordinate.png", "timeline.png"} <= artifacts
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/trials.csv")))
    assert list(table["number"]) == [t.number for t in study.trials]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in child_runs}
    assert [str(c) for c in table["cohort"]] == [by_number[n].data.tags["cohort"] for n in table["number"]]
    for row in table.itertuples():
        run = by_number[row.number]
        assert row.mlflow_run_id == run.info.run_id and row.state == study.trials[row.number].state.name
        models = [m.model_id for m in run.outputs.model_outputs]
        assert (row.mlflow_model_id if isinstance(row.mlflow_model_id, str) else None) == (models[0] if models else None)
    best = table.loc[table["number"] == study.best_trial.number, "mlflow_model_id"].iloc[0]
    assert parent.data.tags["best_model_id"] == best


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_a_trial_is_pruned_before_its_last_epoch_never_after_it(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "make_pruner", lambda config: AlwaysPrune())
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    for epochs, study_name in ((2, "two-epochs"), (1, "one-epoch")):
        assert tune.cli(["--n-trials", "2", "--epochs", str(epochs), "--study-name", study_name,
                         "--source", str(source)]) == 0
    storage = tune.tuning.open_storage(str(workdir / "optuna-journal.log"))
    two, one = (optuna.load_study(study_name=name, storage=storage) for name in ("two-epochs", "one-epoch"))
    assert [(t.state.name, max(t.intermediate_values)) for t in two.trials] == [("PRUNED", 1)] * 2
    assert [t.state.name for t in one.trials] == ["COMPLETE"] * 2


def test_retrain_best_logs_a_model_scored_on_test(workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "2", "--epochs", "1", "--pruner", "none", "--retrain-best", "true", "--source", str(source)]
    assert tune.cli(args) == 0
    (parent,), children = _parent_and_children(workdir)
    (retrained,) = [r for r in children[parent.info.run_id] if r.info.run_name == "best-retrained"]
    assert retrained.info.status == "FINISHED" and "test_accuracy" in retrained.data.metrics
    assert parent.data.metrics["best_test_accuracy"] == retrained.data.metrics["test_accuracy"]
    model = mlflow.pytorch.load_model(f"runs:/{retrained.info.run_id}/model")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# --- slow: the acceptance run, through `mlflow run`, with worker processes ----------------------

@pytest.mark.slow
def test_mlflow_run_tune_four_workers_then_resume_with_two(tmp_path):
    work = tmp_path
    source = write_idx_dir(tmp_path / "idx")
    # `mlflow run` runs in the project directory: the journal (the default kind of storage) goes to tmp.
    common = dict(epochs=3, pruner="hyperband", source=source, data_dir=tmp_path / "data",
                  storage=work / "optuna-journal.log")
    done = mlflow_run("tune", work, n_trials=12, workers=4, **common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stdout + done.stderr
    assert sum(line.startswith("trial ") for line in done.stdout.splitlines()) == 12
    study = _study(work)
    assert len(study.trials) == 12
    assert any(t.state.name == "PRUNED" for t in study.trials)
    (parent,), children = _parent_and_children(work)
    assert parent.info.status == "FINISHED"
    assert_optuna_and_mlflow_agree(study, children[parent.info.run_id], _client(work))
    artifacts = {a.path for a in _client(work).list_artifacts(parent.info.run_id)}
    assert FIGURES <= artifacts and "summary.json" in artifacts
    assert parent.data.params["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials_pruned"] == sum(t.state.name == "PRUNED" for t in study.trials)

    # Same storage and study name: the study grows by n_trials, in a new parent run, with 2 workers.
    done = mlflow_run("tune", work, n_trials=4, workers=2, **common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stdout + done.stderr
    study = _study(work)
    assert len(study.trials) == 16
    parents, children = _parent_and_children(work)
    assert len(parents) == 2 and len(children[parents[1].info.run_id]) == 4
    assert_optuna_and_mlflow_agree(study, [run for runs in children.values() for run in runs], _client(work))


def test_trials_a_dead_worker_left_running_end_failed_in_both_stores_and_are_queued_again(workdir):
    config = TuneConfig(storage=str(workdir / "optuna-journal.log"))
    study = tuning.load_study(config)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    workers = {"dead": {"host": socket.gethostname(), "pid": gone.pid},
               "alive": {"host": socket.gethostname(), "pid": os.getpid()},
               "elsewhere": {"host": "another-machine", "pid": gone.pid}}  # cannot be checked from here
    with mlflow.start_run() as parent_run:
        trials = {}
        for name, worker in workers.items():
            trial = trials[name] = study.ask()
            trial.suggest_float("lr", 1e-3, 1e-1, log=True)
            run_id = tracking.start_child_run(parent_run.info.run_id, parent_run.info.experiment_id, name, {}, {})
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("worker", worker)
        assert tuning.recover_dead_trials(study) == [trials["dead"].number]
    states = {t.number: t.state.name for t in study.trials}
    dead = trials["dead"].number
    assert states == {dead: "FAIL", trials["alive"].number: "RUNNING", trials["elsewhere"].number: "RUNNING", 3: "WAITING"}
    retry = study.trials[3]
    assert retry.system_attrs["fixed_params"] == study.trials[dead].params and retry.user_attrs["retry_of"] == dead
    run = MlflowClient().get_run(study.trials[dead].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "worker process died" in run.data.tags["error"]


# --- cohorts, resumes ----------------------------------------------------------------------------

def _points(study):
    return [(round(t.params["lr"], 12), t.params["batch_size"]) for t in study.trials]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_proposes_new_points_and_repeats_for_the_same_calls(sampler, workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    points = {}
    for name in ("first", "again") if sampler == "random" else ("first",):
        for _ in range(2):  # two calls of 2 trials on one study; TPE's are all start-up (random) trials
            args = ["--n-trials", "2", "--epochs", "1", "--sampler", sampler, "--study-name", name,
                    "--pruner", "none", "--source", str(source)]
            assert tune.cli(args) == 0
        points[name] = _points(_study(workdir, name))
    assert len(set(points["first"])) == 4  # the second call explored, not replayed
    if sampler == "random":
        assert points["again"] == points["first"]  # the same sequence of calls, the same points


def test_a_cohorts_trials_are_distinct_points_trained_together_and_tagged(workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "5", "--epochs", "2", "--cohort", "3", "--sampler", "gp", "--pruner", "none",
            "--source", str(source)]
    assert tune.cli(args) == 0
    study = _study(workdir)
    assert len(set(_points(study))) == 5
    (parent,), children = _parent_and_children(workdir)
    runs = children[parent.info.run_id]
    assert_optuna_and_mlflow_agree(study, runs, _client(workdir))
    cohorts = sorted((r.data.tags["cohort"], r.data.tags["cohort_size"]) for r in runs)
    assert cohorts == [("0", "3")] * 3 + [("3", "2")] * 2  # the budget's last 2 trials form a cohort of 2
    run = next(r for r in runs if r.data.tags["cohort"] == "0")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_trial_is_complete_in_optuna_only_once_its_model_is_logged(workdir, tmp_path, monkeypatch):
    real = tracking.log_model_and_finish
    states_while_logging = []

    def log_model_and_finish(run_id, *args):
        study = _study(workdir)
        (trial,) = [t for t in study.trials if t.user_attrs.get("mlflow_run_id") == run_id]
        states_while_logging.append(trial.state.name)
        real(run_id, *args)

    monkeypatch.setattr(tracking, "log_model_and_finish", log_model_and_finish)
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    assert tune.cli(["--n-trials", "3", "--epochs", "1", "--cohort", "2", "--source", str(source)]) == 0
    # RUNNING until the model is in: a worker killed meanwhile leaves a trial that is recovered and retried.
    assert states_while_logging == ["RUNNING"] * 3
    assert [t.state.name for t in _study(workdir).trials] == ["COMPLETE"] * 3


def test_ctrl_c_ends_a_cohorts_trials_killed_and_queues_them_for_the_next_call(workdir, tmp_path, monkeypatch, capsys):
    real_fit_cohort = tuning.fit_cohort

    def interrupted_after_epoch_1(cohort, train, val, *, on_epoch_end, **options):
        def interrupt(results):
            on_epoch_end(results)
            raise KeyboardInterrupt
        return real_fit_cohort(cohort, train, val, on_epoch_end=interrupt, **options)

    monkeypatch.setattr(tuning, "fit_cohort", interrupted_after_epoch_1)
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    args = ["--n-trials", "2", "--epochs", "2", "--cohort", "2", "--pruner", "none", "--source", str(source)]
    assert tune.cli(args) == 130
    assert "Traceback" not in capsys.readouterr().err
    study = _study(workdir)
    interrupted, queued = study.trials[:2], study.trials[2:]
    assert [t.state.name for t in interrupted] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["interrupted"] for t in interrupted)
    assert [(t.state.name, t.user_attrs["retry_of"], t.system_attrs["fixed_params"]) for t in queued] == \
        [("WAITING", t.number, t.params) for t in interrupted]
    for trial in interrupted:
        run = _client(workdir).get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["interrupted"] == "true"

    monkeypatch.setattr(tuning, "fit_cohort", real_fit_cohort)
    assert tune.cli(args) == 0  # the next call runs the queued trials first
    study = _study(workdir)
    assert [t.state.name for t in study.trials[2:]] == ["COMPLETE", "COMPLETE"]
    retried = _client(workdir).get_run(study.trials[2].user_attrs["mlflow_run_id"])
    assert retried.data.tags["retry_of"] == "0"
    assert retried.data.tags["retry_of_run_id"] == study.trials[0].user_attrs["mlflow_run_id"]


def test_workers_share_the_cores_or_the_hosts_share_given_in_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(tuning, "cpu_cores", lambda: 8)
    assert [tuning.threads_per_worker(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # one of 4 side-by-side worker processes on 8 cores
    assert [tuning.threads_per_worker(n) for n in (1, 2, 4)] == [2, 1, 1]
