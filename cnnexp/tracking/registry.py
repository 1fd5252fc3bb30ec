"""Registered model versions, and the champion alias that moves only to a better-validated version."""
from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.config import JUDGED_BY

CHAMPION = "champion"


def register_and_promote(model_uri: str, name: str) -> tuple[int, bool]:
    """Registers a version; moves alias champion to it only if its judged_value beats the champion's.

    Returns (version, whether it became champion).
    """
    # MLflow 3 keeps models apart from run artifacts; naming the model itself spares a fallback warning.
    model_id = mlflow.models.get_model_info(model_uri).model_id
    version = mlflow.register_model(f"models:/{model_id}" if model_id else model_uri, name)
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        champion = None
    promoted = champion is None or (judged_value(version.model_id, version.run_id)
                                    > judged_value(champion.model_id, champion.run_id))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return int(version.version), promoted


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
