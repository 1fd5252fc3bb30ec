"""Registered versions (cnnexp.tracking.registry): each linked to its logged model both ways, as
mlflow.register_model links them, and the champion alias moving only to a better-validated version."""
import json
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.model import Network
from cnnexp.tracking.mlflow_private import version_model_id
from cnnexp.tracking.models import log_model
from cnnexp.tracking.registry import CHAMPION, judged_value, register_and_promote
from helpers import own_store


def _logged(kept: float, last: float) -> SimpleNamespace:
    """A model logged at step 1, its epoch's val_accuracy `kept` linked to it, in a run whose last epoch
    (step 2, not the model's) reached `last`: the champion rule must judge by `kept`."""
    with mlflow.start_run() as run:
        mlflow.log_metric("val_accuracy", kept, step=1, synchronous=True)
        info = log_model(Network(), torch.rand(2, 1, 28, 28), step=1)
        mlflow.log_metric("val_accuracy", last, step=2, synchronous=True)
    return SimpleNamespace(uri=info.model_uri, model_id=info.model_id, run_id=run.info.run_id)


@pytest.fixture(scope="module")
def models(tmp_path_factory, migrated_store):
    with own_store(tmp_path_factory, "registry", migrated_store):
        torch.manual_seed(0)
        yield SimpleNamespace(worse=_logged(0.5, last=0.95), better=_logged(0.8, last=0.1), client=MlflowClient())


def test_a_version_is_linked_to_its_logged_model_both_ways(models):
    client = models.client
    register_and_promote(models.worse.uri, "linked")
    register_and_promote(models.worse.uri, "linked-too")
    version = client.get_model_version("linked", "1")
    # MLflow 3.17's SQL registry reads model_id back as None (test_mlflow_private pins it); the source links.
    assert version.source == f"models:/{models.worse.model_id}"
    assert version_model_id(version) == models.worse.model_id
    assert version.run_id == models.worse.run_id
    tag = client.get_logged_model(models.worse.model_id).tags["mlflow.modelVersions"]
    assert json.loads(tag) == [{"name": "linked", "version": 1}, {"name": "linked-too", "version": 1}]
    assert "mlflow.modelVersions" not in client.get_logged_model(models.better.model_id).tags


def test_champion_moves_only_to_a_version_whose_model_validates_better(models):
    # The runs' last epochs rank the other way round (0.95 and 0.1): judged by those, "better" would lose.
    assert register_and_promote(models.worse.uri, "ranked") == (1, True)  # the first version is champion
    assert register_and_promote(models.better.uri, "ranked") == (2, True)
    assert register_and_promote(models.worse.uri, "ranked") == (3, False)
    champion = models.client.get_model_version_by_alias("ranked", CHAMPION)
    assert (champion.version, version_model_id(champion)) == (2, models.better.model_id)


def test_a_model_is_judged_by_its_linked_val_accuracy_and_else_by_its_runs(models):
    assert judged_value(models.better.model_id, models.better.run_id) == pytest.approx(0.8)
    assert judged_value(None, models.better.run_id) == pytest.approx(0.1)  # a run without a model: its last epoch
    with mlflow.start_run() as bare:
        pass
    assert judged_value(None, bare.info.run_id) == float("-inf")  # nothing to judge by: never champion
