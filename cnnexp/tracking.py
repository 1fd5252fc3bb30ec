"""The one place that talks to MLflow: runs, params, per-epoch metrics, datasets, models, figures."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from collections.abc import Iterator

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunStatus
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from cnnexp.data import PreparedData
from cnnexp.plots import learning_curves, samples_per_class

MODEL_NAME = "model"
CODE_PATH = str(Path(__file__).resolve().parent)
ERROR_TAG = "error"


@contextlib.contextmanager
def tracked_run(**kwargs) -> Iterator[mlflow.ActiveRun]:
    """Starts (or, under `mlflow run`, resumes) a run and always ends it with the status that happened."""
    with mlflow.start_run(**kwargs) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as err:
            mark_failed(run.info.run_id, err)
            raise


def mark_failed(run_id: str, err: BaseException) -> None:
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
    client.set_terminated(run_id, "FAILED")


def end_pending_run(status: str, err: BaseException | None = None) -> None:
    """Ends the run `mlflow run` created for us if our code never got to end it (e.g. bad parameters)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    with contextlib.suppress(Exception):  # the store itself may be what failed
        if client.get_run(run_id).info.status == "RUNNING":
            if err is not None:
                client.set_tag(run_id, ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, status)


def log_config(config) -> None:
    """Logs a config dataclass as params, skipping those `mlflow run` already logged (params are immutable)."""
    run = mlflow.active_run()
    already = MlflowClient().get_run(run.info.run_id).data.params
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in already}
    if params:
        mlflow.log_params(params)


def log_epoch(metrics: dict) -> None:
    """One batched, non-blocking write per epoch: the store's latency stays off the training loop."""
    values = {k: v for k, v in metrics.items() if k != "epoch"}
    mlflow.log_metrics(values, step=metrics["epoch"], synchronous=False)


def flush() -> None:
    mlflow.flush_async_logging()


def log_environment(device: torch.device, data: PreparedData) -> None:
    mlflow.set_tags(
        {
            "device": str(device),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "data_digest": data.digest,
            "dataset": data.manifest["inputs"]["dataset"],
        }
    )


def log_prepared_data(data: PreparedData) -> None:
    dataset = data.manifest["inputs"]["dataset"]
    for name, split in data.splits.items():
        entry = data.manifest["splits"][name]
        ds = mlflow.data.from_numpy(
            features=split.images.numpy(),
            targets=split.labels.numpy(),
            source=str(data.path / entry["file"]),
            name=f"{dataset}-{name}",
            digest=entry["sha256"][:16],
        )
        mlflow.log_input(ds, context=name)
    mlflow.log_table(
        {
            "class": data.classes,
            **{name: data.manifest["splits"][name]["per_class"] for name in data.splits},
        },
        artifact_file="per_class_counts.json",
    )
    mlflow.log_dict(data.manifest, "manifest.json")
    train = data.splits["train"]
    log_figure(samples_per_class(train.images, train.labels, data.classes), "samples_per_class.png")
    mlflow.set_tag("data_digest", data.digest)


def log_figure(fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_learning_curves(history: list[dict]) -> None:
    log_figure(learning_curves(history), "learning_curves.png")


def log_model(model: torch.nn.Module, example_inputs: torch.Tensor, pip_requirements: list[str] | None = None) -> str:
    """Logs the network; returns its URI.

    Pickled rather than torch.export'ed: an exported program loads as a GraphModule that refuses
    .eval() and .train(), while users of mlflow.pytorch.load_model expect the nn.Module they logged.
    code_paths ships cnnexp inside the model so it loads where cnnexp is not installed.
    pip_requirements=None lets MLflow infer them, which runs a subprocess (seconds);
    tuning passes fixed ones instead (see log_model_and_finish).
    """
    model = model.cpu().eval()
    example = example_inputs[:4].cpu().numpy()
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    info = mlflow.pytorch.log_model(
        model, name=MODEL_NAME, signature=signature, input_example=example,
        serialization_format="pickle", code_paths=[CODE_PATH], pip_requirements=pip_requirements,
    )
    return info.model_uri


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


# --- tuning: child runs written with the client, so several processes can log under one parent ---

def active_run_ids() -> tuple[str, str]:
    """(run id, experiment id) of the active run: what worker processes need to log children under it."""
    info = mlflow.active_run().info
    return info.run_id, info.experiment_id


def start_child_run(parent_run_id: str, experiment_id: str, run_name: str, params: dict, tags: dict) -> str:
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags={MLFLOW_PARENT_RUN_ID: parent_run_id, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def log_child_epoch(run_id: str, metrics: dict) -> None:
    """One synchronous batch per epoch: a few milliseconds, and the run is complete when the trial is."""
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, metrics["epoch"]) for k, v in metrics.items() if k != "epoch"]
    MlflowClient().log_batch(run_id, metrics=values)


def end_child_run(run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value)[:5000])
    client.set_terminated(run_id, status)


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def log_model_and_finish(run_id: str, model: torch.nn.Module, example_inputs: torch.Tensor) -> None:
    """Logs a model into an existing run (from any thread) and ends the run FINISHED either way.

    A model that fails to log leaves a tag, not a FAILED run: the trial itself completed.
    """
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its pickle warning, once per trial, is noise
    try:
        with mlflow.start_run(run_id=run_id):
            # The flavour's own requirements (torch, cloudpickle; MLflow adds itself): inferring them
            # took 4-12 s per model here, longer than a trial; nothing else is needed to load the model.
            log_model(model, example_inputs, pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    except Exception as err:  # noqa: BLE001 - recorded on the run, which must still end
        MlflowClient().set_tag(run_id, "model_error", f"{type(err).__name__}: {err}"[:5000])
    MlflowClient().set_terminated(run_id, "FINISHED")


def log_params(params: dict) -> None:
    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics)


def log_dict(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def use_tracking_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    os.environ.pop("MLFLOW_RUN_ID", None)  # a worker must never resume the parent run as its own


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()
