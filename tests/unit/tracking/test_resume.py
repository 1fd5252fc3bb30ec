"""Interrupts, checkpoints and resume: a stopped run continues into itself and ends where it would have."""
import dataclasses
import json
import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.tracking import log
from cnnexp.tracking.store import redact_url
from cnnexp.checkpoint import CheckpointError, capture, load_checkpoint, restore, save_checkpoint
from cnnexp.train import fit, new_training_state
from helpers import metric_histories, tensor_split, worst_last_epoch
from pipelines import train

ARGS = ["--epochs", "3", "--batch-size", "50", "--device", "cpu"]


def _runs():
    return MlflowClient().search_runs(experiment_ids=["0"], order_by=["attributes.start_time ASC"])


def test_checkpoint_round_trip_is_weights_only_and_altered_files_are_refused(tmp_path):
    state = dataclasses.replace(new_training_state(lr=0.01, seed=0, device=torch.device("cpu")), epoch=2)
    save_checkpoint(tmp_path, capture(state, history=[{"epoch": 1, "x": 0.5}], config={"lr": 0.01}), 1)
    path = save_checkpoint(tmp_path, capture(state, history=[], config={"lr": 0.01}), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "epoch-0002.pt"]  # older ones go
    torch.manual_seed(5)
    other = restore(load_checkpoint(tmp_path), torch.device("cpu"))  # torch.load(weights_only=True) inside
    assert other.epoch == 2 and torch.equal(other.weights, state.weights)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="altered"):
        load_checkpoint(tmp_path)


def test_interrupted_run_ends_killed_and_resumes_into_itself_exactly(workdir, idx_source, monkeypatch, capsys):
    # The best epoch is then one before the interruption: only the checkpoint can bring it back.
    monkeypatch.setattr(train, "fit", worst_last_epoch(train.fit))
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 0
    (straight,) = _runs()

    real_log_epoch = log.log_epoch

    def interrupt_at_epoch_2(metrics):  # after the checkpoint, before the metrics reach the store
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt
        real_log_epoch(metrics)

    monkeypatch.setattr(log, "log_epoch", interrupt_at_epoch_2)
    assert train.cli(ARGS) == 130
    stopped = _runs()[1]
    assert stopped.info.status == "KILLED"
    assert json.loads((workdir / "checkpoints" / stopped.info.run_id / "checkpoint.json").read_text())["epoch"] == 2
    assert [s for s, _ in metric_histories(stopped.info.run_id)["val_loss"]] == [1]
    artifacts = {a.path for a in MlflowClient().list_artifacts(stopped.info.run_id, "checkpoint")}
    assert "checkpoint/checkpoint.json" in artifacts

    monkeypatch.setattr(log, "log_epoch", real_log_epoch)
    assert train.cli(["--resume", stopped.info.run_id]) == 0  # the run's own lr, epochs, ... are kept
    assert len(_runs()) == 2  # no new run in-process
    resumed = MlflowClient().get_run(stopped.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from_epoch"] == "2"
    assert metric_histories(resumed.info.run_id) == metric_histories(straight.info.run_id)
    best = {k: resumed.data.metrics[k] for k in ("best_val_accuracy", "best_epoch")}
    assert best == {k: straight.data.metrics[k] for k in best} and best["best_epoch"] < 3
    (model,), (expected,) = resumed.outputs.model_outputs, straight.outputs.model_outputs
    assert model.step == expected.step == best["best_epoch"]
    weights = [mlflow.pytorch.load_model(f"models:/{m.model_id}").fc1.weight for m in (model, expected)]
    assert torch.equal(*weights)
    assert not (workdir / "checkpoints" / stopped.info.run_id).exists()  # finished: its model is logged


def test_resume_from_the_artifact_store_when_the_local_checkpoint_is_gone(workdir, idx_source, monkeypatch):
    real_log_epoch = log.log_epoch

    def interrupt(metrics):
        raise KeyboardInterrupt

    monkeypatch.setattr(log, "log_epoch", interrupt)
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 130
    (stopped,) = _runs()
    shutil.rmtree(workdir / "checkpoints")
    monkeypatch.setattr(log, "log_epoch", real_log_epoch)
    assert train.cli(["--resume", stopped.info.run_id]) == 0
    assert [s for s, _ in metric_histories(stopped.info.run_id)["val_loss"]] == [1, 2, 3]


def test_redact_url_hides_passwords_only():
    assert redact_url("postgresql://bob:s3cret@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert redact_url("mysql://u:p@h/db?password=x&ssl=1") == "mysql://u:***@h/db?password=***&ssl=1"
    assert redact_url("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert redact_url("postgresql://bob@db/optuna") == "postgresql://bob@db/optuna"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_checkpoint_of_a_cuda_state_loads_weights_only_and_restores_rng(tmp_path):
    cuda = torch.device("cuda")
    state, _ = fit(new_training_state(lr=0.01, seed=0, device=cuda), tensor_split(200, 1), tensor_split(50, 2),
                   batch_size=50, epochs=1)  # weights and Adam moments on the GPU
    save_checkpoint(tmp_path, capture(state, history=[]), 1)
    expected = torch.rand(3, device=cuda)  # the draw right after the checkpoint
    other = restore(load_checkpoint(tmp_path), cuda)
    assert torch.equal(torch.rand(3, device=cuda), expected)
    assert other.weights.is_cuda and torch.equal(other.weights, state.weights)
    assert other.steps == state.steps and torch.equal(other.exp_avg, state.exp_avg)
