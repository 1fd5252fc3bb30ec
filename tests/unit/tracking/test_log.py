"""cnnexp.tracking.log: params from a config (not twice), metrics per epoch at their step, the data a run read."""
from dataclasses import dataclass

import mlflow
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
