"""End to end through `mlflow run`, as a user types it (slow: each run starts a fresh Python)."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.data import load_prepared
from cnnexp.evaluate import predict, score
from cnnexp.model import to_inputs
from helpers import model_uri, run_mlflow
from pipelines import train




def _runs(work):
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return MlflowClient().search_runs(experiment_ids=["0"], order_by=["attributes.start_time ASC"])


@pytest.mark.parametrize("dataset", ["fashion-mnist"])  # mnist: the same path (in-process in test_data)
def test_mlflow_run_prepare_then_train(dataset, tmp_path, idx_source):
    work = tmp_path
    data_dir = tmp_path / "data"
    done = run_mlflow("prepare", work, source=idx_source, data_dir=data_dir, dataset=dataset)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_mlflow("train", work, epochs=2, batch_size=50, data_dir=data_dir, dataset=dataset)
    assert done.returncode == 0, done.stderr[-2000:]
    prepare_run, train_run = _runs(work)
    assert prepare_run.info.status == train_run.info.status == "FINISHED"
    client = MlflowClient()
    assert len(client.get_metric_history(train_run.info.run_id, "val_accuracy")) == 2
    assert train_run.data.tags["data_digest"] == prepare_run.data.tags["data_digest"]
    model = mlflow.pytorch.load_model(model_uri(train_run.info.run_id))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_mlflow_run_train_prepares_on_first_use(tmp_path, idx_source):
    done = run_mlflow("train", tmp_path, epochs=1, source=idx_source, data_dir=tmp_path / "data")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")] == [1]


def test_real_sample_trains_well_above_chance(workdir):
    assert train.cli(["--epochs", "5", "--dataset", "fashion-mnist-sample"]) == 0  # the bundled real images
    (run,) = MlflowClient().search_runs(experiment_ids=["0"])
    model = mlflow.pytorch.load_model(model_uri(run.info.run_id))
    test = load_prepared("data", "fashion-mnist-sample").splits["test"]
    accuracy = score(predict(model, to_inputs(test.images)), test.labels)["accuracy"]
    print(f"real-data test accuracy after 5 epochs: {accuracy:.3f}")
    assert accuracy > 0.6  # chance is 0.1


def _runs_tagged(**tags):
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return MlflowClient().search_runs(["0"], filter_string=query, order_by=["attributes.start_time ASC"])


def test_mlflow_run_main_twice_does_the_expensive_steps_once(tmp_path, idx_source):
    for _ in range(2):
        done = run_mlflow("main", tmp_path, source=idx_source, data_dir=tmp_path / "data", epochs=1)
        assert done.returncode == 0, done.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = _runs_tagged(**{"mlflow.project.entryPoint": "main"})
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
    assert parents[0].data.tags["reused_steps"] == "none"
    assert parents[1].data.tags["reused_steps"] == "prepare,train,evaluate"
    for step in ("prepare", "train", "evaluate"):
        (run,) = _runs_tagged(**{"cnnexp.step": step})
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
