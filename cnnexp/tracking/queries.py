"""Questions asked of finished runs: compare's leaderboard, and which earlier run of a step can be reused."""
from __future__ import annotations

import dataclasses

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from cnnexp.config import ConfigError
from cnnexp.ranking import RANKING_METRIC
from cnnexp.tracking import tags
from cnnexp.tracking.models import last_model_id
from cnnexp.tracking.registry import judged_value
from cnnexp.tracking.runs import metric_by_step

LEADERBOARD_COLUMNS = ["run_id", "run_name", "dataset", "kind", "lr", "batch_size", "epochs", RANKING_METRIC,
                       "test_accuracy", "train_time_s"]


def training_runs(experiment: str, include_trials: bool = False) -> tuple[pd.DataFrame, int]:
    """One row per finished run that trained (has lr and val_accuracy) in the named experiment, and how
    many tuning trials were left out (all are rows with include_trials)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError("experiment", f"no experiment named {experiment!r}")
    client = MlflowClient()
    rows, trials_left_out, parents = [], 0, {}
    for run in client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'"):
        params, metrics = run.data.params, run.data.metrics
        if "lr" not in params or "val_accuracy" not in metrics:
            continue
        is_trial = tags.TRIAL_NUMBER in run.data.tags
        if is_trial and not include_trials:
            trials_left_out += 1
            continue
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "dataset": dataset_of(run, client, parents),
            "kind": "trial" if is_trial else "train",
            "lr": float(params["lr"]),
            "batch_size": int(params.get("batch_size", 0)),
            "epochs": int(params.get("epochs", 0)),
            RANKING_METRIC: judged_value(last_model_id(run), run.info.run_id),
            "test_accuracy": metrics.get("test_accuracy", float("nan")),
            "train_time_s": train_time_s(client, run),
        })
    return pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS), trials_left_out


def dataset_of(run: Run, client: MlflowClient, parents: dict[str, str]) -> str:
    """The dataset a run trained on: its `dataset` tag (which names the sample where a download fell back to
    it), else its param. A tuning trial has neither: its study's parent run has them (looked up once, in
    `parents`). An empty name where nothing says: such runs rank among themselves."""
    named = run.data.tags.get(tags.DATASET) or run.data.params.get("dataset")
    parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if named or not parent_id:
        return named or ""
    if parent_id not in parents:
        try:
            parents[parent_id] = dataset_of(client.get_run(parent_id), client, parents)
        except mlflow.exceptions.MlflowException:  # a deleted parent
            parents[parent_id] = ""
    return parents[parent_id]


def train_time_s(client: MlflowClient, run: Run) -> float:
    """Seconds spent training: the sum of its epochs' epoch_time_s. A resumed run's wall-clock span would
    count the time it sat interrupted; runs from before epoch_time_s was logged fall back to that span."""
    epochs = metric_by_step(run.info.run_id, "epoch_time_s", client)
    if epochs:
        return round(sum(epochs.values()), 1)
    return round((run.info.end_time - run.info.start_time) / 1000, 1)


def find_step_run(step: str, config, code_version: str, data_digest: str) -> Run | None:
    """A finished run of this step with equal params (by value), code version and data digest."""
    experiment_id = mlflow.active_run().info.experiment_id
    query = (f"tags.`{tags.STEP}` = '{step}' and tags.`{tags.CODE_VERSION}` = '{code_version}' "
             "and attributes.status = 'FINISHED'")
    for run in MlflowClient().search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]):
        if run.data.tags.get(tags.DATA_DIGEST) == data_digest and same_params(run.data.params, config):
            return run
    return None


def same_params(logged: dict[str, str], config) -> bool:
    """Params are logged as strings ("0.01", "1e-2", "100"): compare them as the config's types."""
    cast = {"int": int, "float": float, "bool": lambda text: text.lower() == "true", "str": str}
    for f in dataclasses.fields(config):
        if f.name not in logged:
            return False
        try:
            if cast[str(f.type)](logged[f.name]) != getattr(config, f.name):
                return False
        except ValueError:
            return False
    return True


def mark_step(run_id: str, step: str, code_version: str) -> None:
    """Tags a finished step run so a later main can find and reuse it."""
    client = MlflowClient()
    client.set_tag(run_id, tags.STEP, step)
    client.set_tag(run_id, tags.CODE_VERSION, code_version)
