"""The one place that talks to MLflow: runs, params, per-epoch metrics, datasets, models, figures."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from pathlib import Path
from collections.abc import Iterator

import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

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


def log_model(model: torch.nn.Module, example_inputs: torch.Tensor) -> str:
    """Logs the network; returns its URI.

    Pickled rather than torch.export'ed: an exported program loads as a GraphModule that refuses
    .eval() and .train(), while users of mlflow.pytorch.load_model expect the nn.Module they logged.
    code_paths ships cnnexp inside the model so it loads where cnnexp is not installed.
    """
    model = model.cpu().eval()
    example = example_inputs[:4].cpu().numpy()
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    info = mlflow.pytorch.log_model(
        model, name=MODEL_NAME, signature=signature, input_example=example,
        serialization_format="pickle", code_paths=[CODE_PATH],
    )
    return info.model_uri


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)
