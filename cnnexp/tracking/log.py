"""What goes into a run: params from a config, per-epoch metrics, the environment, datasets, tables, figures."""
from __future__ import annotations

import dataclasses
import platform
import time

import mlflow
import pandas as pd
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.data import PreparedData
from cnnexp.tracking import tags
from cnnexp.tracking.store import writes_queued


def log_config(config) -> None:
    """Logs a config dataclass as params, skipping those `mlflow run` already logged (params are immutable)."""
    run = mlflow.active_run()
    already = MlflowClient().get_run(run.info.run_id).data.params
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in already}
    if params:
        mlflow.log_params(params)


def log_params(params: dict) -> None:
    mlflow.log_params(params)


def log_epoch(metrics: dict) -> None:
    """One batched write per epoch (queued to a server: store.writes_queued)."""
    values = {k: v for k, v in metrics.items() if k != "epoch"}
    mlflow.log_metrics(values, step=metrics["epoch"], synchronous=not writes_queued())


def log_child_epoch(run_id: str, metrics: dict) -> None:
    """One synchronous batch per epoch into a run that is not the active one (a trial's): a few
    milliseconds, and the run is complete when the trial is."""
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, metrics["epoch"]) for k, v in metrics.items() if k != "epoch"]
    MlflowClient().log_batch(run_id, metrics=values)


def flush() -> None:
    mlflow.flush_async_logging()


def log_metrics(metrics: dict[str, float], run_id: str | None = None, model_id: str | None = None,
                dataset: mlflow.data.Dataset | None = None) -> None:
    """Onto the active run, or onto another (finished) run, e.g. test metrics onto the training run.

    With model_id (and the dataset they were computed on) they are that model's metrics too: the
    Models tab and mlflow.search_logged_models show them.
    """
    if run_id is None:
        mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
        return
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


def log_environment(device: torch.device, data: PreparedData) -> None:
    mlflow.set_tags({
        tags.DEVICE: str(device), tags.TORCH_VERSION: torch.__version__, tags.PYTHON_VERSION: platform.python_version(),
        **data_tags(data),
    })


def data_tags(data: PreparedData) -> dict[str, str]:
    """Which prepared data a run read: its digest, and the dataset it holds."""
    return {tags.DATA_DIGEST: data.digest, tags.DATASET: data.manifest["inputs"]["dataset"]}


def split_dataset(data: PreparedData, name: str) -> mlflow.data.Dataset:
    """A prepared split as an MLflow dataset: named <dataset>-<split>, digest from its file's sha256."""
    entry, split = data.manifest["splits"][name], data.splits[name]
    return mlflow.data.from_numpy(
        features=split.images.numpy(),
        targets=split.labels.numpy(),
        source=str(data.path / entry["file"]),
        name=f"{data.manifest['inputs']['dataset']}-{name}",
        digest=entry["sha256"][:16],
    )


# How a SQL store says another writer inserted the same row first: sqlite, PostgreSQL, MySQL; a server relays it.
DUPLICATE_ROW = ("unique constraint failed", "duplicate key value violates unique constraint", "duplicate entry")


def log_input(dataset: mlflow.data.Dataset, context: str) -> None:
    """mlflow.log_input, tried once more when another run of the experiment logged the same dataset at once.

    MLflow's SQL store looks the dataset up and then inserts it (SqlAlchemyStore._log_inputs_impl), so of
    two runs logging one dataset together (workers of a study, trainings side by side on one server) one
    fails on the table's unique key and nothing of its call is kept. The second try finds the winner's row
    and only links it to this run.
    """
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as err:
        if not any(marker in str(err).lower() for marker in DUPLICATE_ROW):
            raise
        mlflow.log_input(dataset, context=context)


def log_prepared_data(data: PreparedData) -> None:
    for name in data.splits:
        log_input(split_dataset(data, name), context=name)
    mlflow.log_table(
        {"class": data.classes, **{name: data.manifest["splits"][name]["per_class"] for name in data.splits}},
        artifact_file="per_class_counts.json",
    )
    mlflow.log_dict(data.manifest, "manifest.json")
    from cnnexp import plots  # matplotlib (half a second): loaded where a figure is drawn, not before training

    train = data.splits["train"]
    log_figure(plots.samples_per_class(train.images, train.labels, data.classes), "samples_per_class.png")
    mlflow.set_tags(data_tags(data))


def log_figure(fig, artifact_file: str, also_on: str | None = None) -> None:
    """The figure into the active run, and also into run `also_on` when given (a finished run: MLflow allows it)."""
    from cnnexp import plots

    mlflow.log_figure(fig, artifact_file)
    if also_on:
        MlflowClient().log_figure(also_on, fig, artifact_file)
    plots.close(fig)


def log_dict(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_csv(frame: pd.DataFrame, artifact_file: str, index: bool = False) -> None:
    mlflow.log_text(frame.to_csv(index=index), artifact_file)


def log_table(frame: pd.DataFrame, artifact_file: str) -> None:
    """A table the MLflow UI shows (and compares across runs) in its Evaluation/artifact views."""
    mlflow.log_table(frame, artifact_file=artifact_file)
