"""cnnexp.tuning.trials through tune: cohorts, divergence, pruning, models before completion, faults, Ctrl-C."""
import threading

import mlflow
import optuna
import pytest
import torch

from cnnexp.engine import NonFiniteLoss
from cnnexp.tuning import recovery
from cnnexp.tuning import study as study_module
from cnnexp.tuning import trials
from helpers import (assert_optuna_and_mlflow_agree, assert_study_table_and_figures, client_of,
                     interrupted_after_epoch_1, model_uri, parent_and_children, points_of, study_of, write_idx_dir)
from pipelines import tune


def _diverging_at_batch_16(monkeypatch):
    """Members of batch size 16 diverge in their first epoch (a lone trial's engine and a cohort's alike)."""

    class Diverging(trials.Engine):
        def epoch(self, on_step=None):
            sizes = {slot: s.member.batch_size for slot, s in self.slots.items()}
            results = super().epoch(on_step)
            for slot, result in results.items():
                if sizes[slot] == 16 and not isinstance(result, NonFiniteLoss):
                    results[slot] = NonFiniteLoss(result["epoch"], float("nan"))
            return results

    monkeypatch.setattr(trials, "Engine", Diverging)


@pytest.mark.study_figures
@pytest.mark.parametrize("cohort", [1, 3])
def test_diverging_trials_fail_in_both_stores_and_the_study_goes_on(cohort, workdir, tmp_path, monkeypatch):
    _diverging_at_batch_16(monkeypatch)
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "6", "--epochs", "2", "--batch-min", "16", "--batch-max", "32", "--cohort", str(cohort),
            "--pruner", "none", "--sampler", "random", "--source", str(source)]
    assert tune.cli(args) == 0
    study = study_of(workdir)
    states = [t.state.name for t in study.trials]
    assert "FAIL" in states and "COMPLETE" in states and len(states) == 6
    (parent,), children = parent_and_children(workdir)
    assert_optuna_and_mlflow_agree(study, children[parent.info.run_id], client_of(workdir))
    failed = [r for r in children[parent.info.run_id] if r.info.status == "FAILED"]
    assert all("training loss became nan" in r.data.tags["error"] for r in failed)
    assert parent.data.metrics["trials_failed"] == states.count("FAIL")
    assert parent.info.status == "FINISHED"
    assert_study_table_and_figures(study, parent, children[parent.info.run_id])


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_a_trial_is_pruned_before_its_last_epoch_never_after_it(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "make_pruner", lambda config: AlwaysPrune())
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    for epochs, study_name in ((2, "two-epochs"), (1, "one-epoch")):
        assert tune.cli(["--n-trials", "2", "--epochs", str(epochs), "--study-name", study_name,
                         "--source", str(source)]) == 0
    storage = study_module.open_storage(str(workdir / "optuna-journal.log"))
    two, one = (optuna.load_study(study_name=name, storage=storage) for name in ("two-epochs", "one-epoch"))
    assert [(t.state.name, max(t.intermediate_values)) for t in two.trials] == [("PRUNED", 1)] * 2
    assert [t.state.name for t in one.trials] == ["COMPLETE"] * 2


def test_a_cohorts_trials_are_distinct_points_each_with_its_model_tagged_with_its_run(workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    args = ["--n-trials", "5", "--epochs", "2", "--cohort", "3", "--sampler", "gp", "--pruner", "none",
            "--source", str(source)]
    assert tune.cli(args) == 0
    study = study_of(workdir)
    assert len(set(points_of(study))) == 5
    (parent,), children = parent_and_children(workdir)
    runs = children[parent.info.run_id]
    assert_optuna_and_mlflow_agree(study, runs, client_of(workdir))
    run = runs[0]
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # MLflow's own address of a run's model
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    logged = client_of(workdir).get_logged_model(model_uri(run.info.run_id, client_of(workdir))[len("models:/"):])
    assert logged.tags["cnnexp.run_name"] == run.info.run_name  # what tells the trials' models apart


class PruneTrialZero(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 0


def test_a_pruned_trials_place_is_taken_by_a_new_trial_while_the_others_train_on(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "make_pruner", lambda config: PruneTrialZero())
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    assert tune.cli(["--n-trials", "3", "--epochs", "3", "--cohort", "2", "--source", str(source)]) == 0
    study = study_of(workdir)
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE", "COMPLETE"]
    (parent,), children = parent_and_children(workdir)
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in children[parent.info.run_id]}
    assert runs[2].info.start_time < runs[1].info.end_time  # joined while trial 1 was still training
    assert sorted(study.trials[2].intermediate_values) == [1, 2, 3]  # its own epochs, from its first
    assert_optuna_and_mlflow_agree(study, list(runs.values()), client_of(workdir))


def test_every_trial_beats_as_it_joins_so_a_lost_worker_s_trial_can_go_stale(workdir, tmp_path, monkeypatch):
    # Optuna never calls a trial that has not beaten stale. sqlite stands in for a server database here,
    # with the periodic beat (10 s) out of the way: trials that take a freed slot must beat on joining.
    monkeypatch.setattr(trials, "has_heartbeats", lambda storage: True)
    monkeypatch.setattr(recovery, "HEARTBEAT_INTERVAL_S", 3600)
    beaten = set()
    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", lambda self, trial_id: beaten.add(trial_id))
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert tune.cli(["--storage", storage, "--n-trials", "3", "--epochs", "1", "--cohort", "1", "--pruner", "none",
                     "--source", str(source)]) == 0
    study = optuna.load_study(study_name="cnnexp-tune", storage=storage)
    assert len(study.trials) == 3 and beaten == {t._trial_id for t in study.trials}


def test_a_trial_is_complete_in_optuna_only_once_its_model_is_logged(workdir, tmp_path, monkeypatch):
    real = trials.log_model_and_finish
    states_while_logging = []

    def log_model_and_finish(run_id, *args, **kwargs):
        study = study_of(workdir)
        (trial,) = [t for t in study.trials if t.user_attrs.get("mlflow_run_id") == run_id]
        states_while_logging.append(trial.state.name)
        real(run_id, *args, **kwargs)

    monkeypatch.setattr(trials, "log_model_and_finish", log_model_and_finish)
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    assert tune.cli(["--n-trials", "3", "--epochs", "1", "--cohort", "2", "--source", str(source)]) == 0
    # RUNNING until the model is in: a worker killed meanwhile leaves a trial that is recovered and retried.
    assert states_while_logging == ["RUNNING"] * 3
    assert [t.state.name for t in study_of(workdir).trials] == ["COMPLETE"] * 3


def test_ctrl_c_ends_a_cohorts_trials_killed_and_queues_them_for_the_next_call(workdir, tmp_path, monkeypatch, capsys):
    real_engine = trials.Engine
    monkeypatch.setattr(trials, "Engine", interrupted_after_epoch_1(real_engine))
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    args = ["--n-trials", "2", "--epochs", "2", "--cohort", "2", "--pruner", "none", "--source", str(source)]
    assert tune.cli(args) == 130
    assert "Traceback" not in capsys.readouterr().err
    study = study_of(workdir)
    interrupted, queued = study.trials[:2], study.trials[2:]
    assert [t.state.name for t in interrupted] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["interrupted"] for t in interrupted)
    assert [(t.state.name, t.user_attrs["retry_of"], t.system_attrs["fixed_params"]) for t in queued] == \
        [("WAITING", t.number, t.params) for t in interrupted]
    for trial in interrupted:
        run = client_of(workdir).get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["interrupted"] == "true"

    monkeypatch.setattr(trials, "Engine", real_engine)
    assert tune.cli(args) == 0  # the next call runs the queued trials first
    study = study_of(workdir)
    assert [t.state.name for t in study.trials[2:]] == ["COMPLETE", "COMPLETE"]
    retried = client_of(workdir).get_run(study.trials[2].user_attrs["mlflow_run_id"])
    assert retried.data.tags["retry_of"] == "0"
    assert retried.data.tags["retry_of_run_id"] == study.trials[0].user_attrs["mlflow_run_id"]


def _failing_once(monkeypatch, owner, name, error, when, before=lambda: None):
    """MLflow's own owner.name raises `error` at the first call for which when(*args, **kwargs) holds."""
    real, failed = getattr(owner, name), []

    def failing(*args, **kwargs):
        if not failed and when(*args, **kwargs):
            failed.append(name)
            before()
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _second_call():
    calls = []
    return lambda *args, **kwargs: calls.append(1) or len(calls) == 2


def _tracker_keeping_up(monkeypatch, method):
    """Every tracking job done before the runner's next `method` call, as when the store keeps up."""
    real = getattr(trials.Tracker, method)
    monkeypatch.setattr(trials.Tracker, method, lambda self, *args: (self.jobs.join(), real(self, *args))[1])


@pytest.mark.parametrize("seen", ["between epochs", "at the end"])
def test_a_trial_whose_model_cannot_be_logged_fails_in_both_stores_and_stops_the_call(seen, workdir, tmp_path,
                                                                                     monkeypatch, capsys):
    full_disk = OSError(28, "No space left on device")
    if seen == "between epochs":  # the runner checks the tracker after trial 1's epoch, its job done
        _tracker_keeping_up(monkeypatch, "check")
        _failing_once(monkeypatch, mlflow.models.Model, "log", full_disk, _second_call())
        args = ["--n-trials", "3", "--cohort", "1"]
    else:  # trial 1's model fails only once training has ended and the runner waits for the tracker
        drained = threading.Event()
        drain = trials.Tracker.drain
        monkeypatch.setattr(trials.Tracker, "drain", lambda self: (drained.set(), drain(self))[1])
        _failing_once(monkeypatch, mlflow.models.Model, "log", full_disk, _second_call(), before=lambda: drained.wait(60))
        args = ["--n-trials", "2", "--cohort", "2"]
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    assert tune.cli([*args, "--epochs", "1", "--pruner", "none", "--source", str(source)]) != 0
    assert "No space left on device" in capsys.readouterr().err
    study = study_of(workdir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]  # trial 2 never asked: the call stopped
    assert study.best_trial.number == 0  # the best has its model
    failed = client_of(workdir).get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED" and not failed.outputs.model_outputs
    assert failed.data.tags["error"] == "model not logged: OSError: [Errno 28] No space left on device"


def test_a_trial_is_told_when_the_tracker_s_error_surfaces_as_its_end_is_handed_over(workdir, tmp_path, monkeypatch):
    # Trial 0's epoch fails to log; the error is pending as the runner hands its end to the tracker.
    _tracker_keeping_up(monkeypatch, "submit")
    _failing_once(monkeypatch, mlflow.tracking.MlflowClient, "log_batch", OSError(28, "No space left on device"),
                  when=lambda self, run_id, metrics=(), **kwargs: any(m.key == "train_loss" for m in metrics))
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    assert tune.cli(["--n-trials", "2", "--epochs", "1", "--cohort", "1", "--pruner", "none",
                     "--source", str(source)]) != 0
    study = study_of(workdir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # told (its model is in), and the call stopped
    assert client_of(workdir).get_run(study.trials[0].user_attrs["mlflow_run_id"]).info.status == "FINISHED"


class _JoinFails(trials.Engine):
    """An engine whose every join fails, after the trial was asked and suggested, with `error`."""
    error: BaseException

    def join(self, state, batch_size):
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_a_trial_asked_in_the_first_fill_is_told_whatever_stops_it(error, workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(_JoinFails, "error", error, raising=False)
    monkeypatch.setattr(trials, "Engine", _JoinFails)
    source = write_idx_dir(tmp_path / "idx", n_train=100, n_test=30)
    code = tune.cli(["--n-trials", "2", "--epochs", "1", "--cohort", "2", "--source", str(source)])
    states = [t.state.name for t in study_of(workdir).trials]
    if isinstance(error, KeyboardInterrupt):
        assert code == 130 and states == ["FAIL", "WAITING"]  # interrupted, and queued for the next call
    else:
        assert states == ["FAIL", "FAIL"]  # each failed; the study went on


def test_a_trial_whose_end_is_queued_keeps_its_heartbeat_until_optuna_is_told():
    """On a database storage another worker fails a trial silent for the grace period; a model's upload on a busy
    machine outlasted it (16 workers on 2 cores), so a trial handed to the tracker stays among those beaten for."""
    release, telling = threading.Event(), threading.Event()

    class SlowToTell:
        def tell(self, trial, **outcome):
            telling.set()
            release.wait(10)
            return trial

    tracker = trials.Tracker(SlowToTell(), [], val=None)
    run = trials.TrialRun(trial="trial 7")
    tracker.end(run, "KILLED", optuna.trial.TrialState.PRUNED, {})
    assert telling.wait(10)
    assert tracker.telling() == [run]
    release.set()
    tracker.drain()
    assert tracker.telling() == []
    tracker.close()
