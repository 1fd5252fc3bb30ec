"""Registered model versions, and the champion alias that moves only to a better-validated version."""
from __future__ import annotations

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from cnnexp.ranking import JUDGED_BY
from cnnexp.tracking.mlflow_private import link_version_to_logged_model, version_model_id
from cnnexp.tracking.models import resolve_model

CHAMPION = "champion"


def register_and_promote(model_uri: str, name: str) -> tuple[int, bool]:
    """Registers a version; moves alias champion to it only if its judged_value beats the champion's.

    Returns (version, whether it became champion).
    """
    client = MlflowClient()
    version = create_version(client, model_uri, name)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        champion = None
    promoted = champion is None or (judged_value(version_model_id(version), version.run_id)
                                    > judged_value(version_model_id(champion), champion.run_id))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return int(version.version), promoted


def create_version(client: MlflowClient, model_uri: str, name: str) -> ModelVersion:
    """A new version of the registered model `name` (created if new) from the logged model at model_uri,
    linked both ways as mlflow.register_model links them: the version's model_id and source
    (models:/<model_id>), the model's `mlflow.modelVersions` tag.

    The client's calls, not mlflow.register_model, which prints "Registered model ... already exists" and
    "Created version ..." on stderr, lines our one line already says.
    """
    model_uri, run_id, model_id = resolve_model(model_uri)  # runs:/<run_id>/model too, whatever the model's name
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    # MLflow 3 keeps models apart from run artifacts: the version's source is the LoggedModel itself.
    source = f"models:/{model_id}" if model_id else model_uri
    version = client.create_model_version(name, source, run_id=run_id, model_id=model_id)
    link_version_to_logged_model(client, version)
    return version


def judged_value(model_id: str | None, run_id: str) -> float:
    """What a model is judged by (JUDGED_BY): the val_accuracy its training run linked to it, i.e. that
    of the epoch whose weights it holds. A model logged before metrics were linked to models holds the
    last epoch's weights, so for it (or a run without a model) it is the run's final val_accuracy."""
    client = MlflowClient()
    if model_id:
        linked = [m.value for m in client.get_logged_model(model_id).metrics or []
                  if m.key == JUDGED_BY and m.run_id == run_id]
        if linked:
            return linked[-1]
    return client.get_run(run_id).data.metrics.get(JUDGED_BY, float("-inf"))
