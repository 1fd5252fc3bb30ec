"""The logged model (cnnexp.tracking.models) as MLflow's own tools read it: mlflow.models.evaluate with no
wrapper, the pyfunc's `output` param, its name and how a URI finds it; on a network trained a few steps
on the synthetic bars."""
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from cnnexp.evaluate import predict
from cnnexp.model import Network, to_inputs
from cnnexp.checks import ConfigError
from cnnexp.tracking import models
from cnnexp.tracking.models import log_model, resolve_model
from helpers import own_store, synthetic_split

CLASSES = [f"class-{i}" for i in range(10)]


def _trained_network() -> Network:
    """A few Adam steps: enough that its answers differ per image, so agreeing with them means something."""
    torch.manual_seed(0)
    images, labels = synthetic_split(200, seed=5)
    inputs, targets = to_inputs(torch.from_numpy(images)), torch.from_numpy(labels).long()
    network = Network()
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    for step in range(20):
        batch = slice(step % 4 * 50, step % 4 * 50 + 50)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(inputs[batch]), targets[batch]).backward()
        optimizer.step()
    return network.eval()


@pytest.fixture(scope="module")
def logged(tmp_path_factory, migrated_store):
    with own_store(tmp_path_factory, "models", migrated_store):
        network = _trained_network()
        with mlflow.start_run(run_name="train-lr0.01-bs50") as run:
            info = log_model(network, torch.rand(2, 1, 28, 28), CLASSES)
        images, labels = synthetic_split(120, seed=9)
        logits = predict(network, to_inputs(torch.from_numpy(images)))
        yield SimpleNamespace(info=info, run_id=run.info.run_id, images=images, labels=labels.astype(np.int64),
                              logits=logits)


def test_mlflow_evaluate_scores_the_logged_model_as_a_classifier_with_no_wrapper(logged):
    data = pd.DataFrame(logged.images.reshape(len(logged.images), -1)).add_prefix("pixel")
    data["label"] = logged.labels
    with mlflow.start_run():
        result = mlflow.models.evaluate(f"runs:/{logged.run_id}/model", data, targets="label", model_type="classifier")
    predicted = logged.logits.argmax(dim=1).numpy()
    assert 0.3 < result.metrics["accuracy_score"] < 1  # the network learned something, and not everything
    assert result.metrics["accuracy_score"] == pytest.approx((predicted == logged.labels).mean())
    assert 0 < result.metrics["f1_score"] <= 1
    assert {"confusion_matrix", "per_class_metrics"} <= set(result.artifacts)
    # MLflow 3.17's classifier evaluator asks only sklearn, xgboost and catboost models for probabilities
    # (evaluators/classifier.py, _extract_predict_fn_and_predict_proba_fn), so no log_loss or roc_auc here;
    # docs/models.md computes them from output="probabilities". If this fails, MLflow now takes them: say so there.
    assert "log_loss" not in result.metrics and "roc_auc" not in result.metrics


def test_the_pyfunc_answers_indices_by_default_and_names_or_probabilities_on_request(logged):
    model = mlflow.pyfunc.load_model(logged.info.model_uri)
    expected = logged.logits.argmax(dim=1).numpy()
    indices = model.predict(logged.images)
    assert isinstance(indices, pd.Series) and indices.name == "class_index"
    np.testing.assert_array_equal(indices.to_numpy(), expected)
    named = model.predict(logged.images, params={"output": "named"})
    assert list(named["class_name"]) == [CLASSES[i] for i in expected]
    probabilities = model.predict(logged.images, params={"output": "probabilities"})
    assert list(probabilities.columns) == CLASSES
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.to_numpy().argmax(axis=1), expected)
    np.testing.assert_allclose(probabilities.to_numpy(), torch.softmax(logged.logits, dim=1).numpy(), rtol=1e-5)


def test_an_unknown_output_is_the_callers_error_naming_the_choices(logged):
    model = mlflow.pyfunc.load_model(logged.info.model_uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match="output must be one of class_index, named") as refused:
        model.predict(logged.images[:1], params={"output": "logits"})
    assert refused.value.get_http_status_code() == 400


def test_mlflows_own_loaders_take_runs_model_and_the_run_name_tells_models_apart(logged):
    """runs:/<run_id>/model is every MLflow tutorial's address: MLflow resolves it by the model's name."""
    uri = f"runs:/{logged.run_id}/model"
    model = mlflow.get_logged_model(logged.info.model_id)
    assert model.name == "model" and model.tags["cnnexp.run_name"] == "train-lr0.01-bs50"
    assert mlflow.models.get_model_info(uri).model_id == logged.info.model_id
    expected = logged.logits.argmax(dim=1).numpy()
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(uri).predict(logged.images).to_numpy(), expected)
    network = mlflow.pytorch.load_model(uri)
    assert torch.equal(predict(network, to_inputs(torch.from_numpy(logged.images))).argmax(dim=1),
                       torch.from_numpy(expected))


def test_a_model_is_found_as_its_runs_model(logged):
    model_id, run_id = logged.info.model_id, logged.run_id
    for uri in (f"runs:/{run_id}/model", run_id):  # cnnexp's commands also take a bare run id
        assert resolve_model(uri) == (f"runs:/{run_id}/model", run_id, model_id)
    assert resolve_model(f"models:/{model_id}") == (f"models:/{model_id}", run_id, model_id)


def test_a_model_logged_under_its_runs_name_is_still_its_runs_model(logged, monkeypatch):
    """Models logged while they took their run's name (train-lr0_01-bs100) stay reachable by cnnexp's commands."""
    monkeypatch.setattr(models, "MODEL_NAME", "train-lr0_01-bs50")
    with mlflow.start_run() as run:
        info = log_model(_trained_network(), torch.rand(2, 1, 28, 28), CLASSES)
    monkeypatch.undo()
    assert resolve_model(run.info.run_id) == (f"models:/{info.model_id}", run.info.run_id, info.model_id)


@pytest.mark.parametrize("uri", ["runs:/0123456789abcdef/model", "0123456789abcdef", "runs:/RUN/other-name"])
def test_a_uri_that_finds_no_model_is_one_config_error_naming_it(logged, uri):
    uri = uri.replace("RUN", logged.run_id)
    with pytest.raises(ConfigError, match="no model at") as refused:
        resolve_model(uri)
    assert "\n" not in str(refused.value)
