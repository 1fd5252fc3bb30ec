"""cnnexp.tracking.log: params from a config (not twice), metrics per epoch at their step, the data a run read."""
import threading
from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.tracking import log, tags


@dataclass(frozen=True)
class Config:
    lr: float = 0.01
    epochs: int = 3


def test_a_config_is_logged_once_even_where_mlflow_run_logged_its_params_first(workdir):
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.01")  # as `mlflow run` logs the -P values
        log.log_config(Config())
    assert MlflowClient().get_run(run.info.run_id).data.params == {"lr": "0.01", "epochs": "3"}


def test_epochs_are_logged_at_their_step_and_a_trials_epochs_into_its_own_run(workdir):
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            log.log_epoch({"epoch": epoch, "val_accuracy": 0.5 + epoch / 10})
        log.flush()
    with mlflow.start_run() as trial:
        pass
    log.log_child_epoch(trial.info.run_id, {"epoch": 4, "val_accuracy": 0.9})
    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [(1, 0.6), (2, 0.7)]
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "val_accuracy")] == [(4, 0.9)]


def test_the_prepared_data_is_recorded_as_three_datasets_and_tags(workdir, idx_source):
    from cnnexp.config import PrepareConfig
    from cnnexp.data import prepare

    data, _ = prepare(PrepareConfig(source=str(idx_source), data_dir=str(workdir / "data")))
    with mlflow.start_run() as run:
        log.log_prepared_data(data)
    recorded = MlflowClient().get_run(run.info.run_id)
    assert {d.dataset.name for d in recorded.inputs.dataset_inputs} == {f"fashion-mnist-{s}" for s in ("train", "val", "test")}
    assert recorded.data.tags[tags.DATA_DIGEST] == data.digest


def log_side_by_side(run_ids: list[str], dataset: mlflow.data.Dataset, log_input) -> list[Exception]:
    """Each run logs the dataset in its own thread, all released at once, as workers on one store would."""
    start, errors = threading.Barrier(len(run_ids)), []

    def one(run_id):
        start.wait()
        try:
            with mlflow.start_run(run_id=run_id):
                log_input(dataset, context="val")
        except Exception as err:  # noqa: BLE001 - counted by the test
            errors.append(err)

    threads = [threading.Thread(target=one, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_runs_logging_one_dataset_at_once_each_get_it_though_the_store_inserts_it_once(workdir):
    """The CI's server test lost a training to MLflow's look-up-then-insert: UNIQUE constraint failed on datasets.

    Eight runs per round, fresh datasets each round: mlflow.log_input alone fails in most rounds here.
    """
    client = MlflowClient()
    experiment = client.create_experiment("side-by-side")
    for round_ in range(5):
        runs = [client.create_run(experiment).info.run_id for _ in range(8)]
        dataset = mlflow.data.from_numpy(np.zeros((4, 2)), name=f"fashion-mnist-val-{round_}", digest=f"d{round_}")
        assert log_side_by_side(runs, dataset, log.log_input) == []
        assert all([d.dataset.digest for d in client.get_run(r).inputs.dataset_inputs] == [f"d{round_}"] for r in runs)


def test_an_input_the_store_refuses_for_another_reason_is_not_tried_again(workdir, monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    monkeypatch.setattr(mlflow, "log_input", refuse)
    with pytest.raises(MlflowException, match="no such run"):
        log.log_input(mlflow.data.from_numpy(np.zeros((4, 2)), name="d"), context="val")
    assert len(calls) == 1
