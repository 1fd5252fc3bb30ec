"""evaluate, the served model's two faces, the registry's champion, and compare, on two trained runs."""
import io
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.evaluate import confident_mistakes
from cnnexp.ranking import JUDGED_BY, RANKING_METRIC
from cnnexp.tracking.pyfunc import ServedClassifier
from cnnexp.tracking.registry import judged_value, register_and_promote
from cnnexp.tracking.runs import epoch_history
from cnnexp.config import CompareConfig
from cnnexp.data import load_prepared
from cnnexp.model import Network
from cnnexp.serving import as_inputs
from helpers import model_uri, own_store, write_idx_dir
from pipelines import compare, evaluate, prepare, train

LRS = (0.01, 0.0003)  # in 2 epochs on the synthetic bars the first learns and the second barely starts


@pytest.fixture(scope="module")
def trained(tmp_path_factory, migrated_store):
    """Two training runs with different lr, each evaluated on the test split (shared: training costs)."""
    with own_store(tmp_path_factory, "eval", migrated_store) as work:
        source = write_idx_dir(work / "idx")
        for lr in LRS:
            assert train.cli(["--lr", str(lr), "--epochs", "2", "--batch-size", "50", "--source", str(source)]) == 0
        client = MlflowClient()
        runs = {float(r.data.params["lr"]): r.info.run_id for r in client.search_runs(["0"])}
        evaluations = {}
        for lr, run_id in runs.items():
            assert evaluate.cli(["--model-uri", f"runs:/{run_id}/model"]) == 0
            (evaluations[lr],) = client.search_runs(["0"], filter_string=f"tags.scored_run_id = '{run_id}'")
        yield SimpleNamespace(work=work, source=source, runs=runs, evaluations=evaluations, client=client)


def _csv(run_id: str, path: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")), **kwargs)


def test_confident_mistakes_are_wrong_and_most_confident_first():
    logits = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 9.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    assert confident_mistakes(logits, labels, k=5).tolist() == [2, 3, 1]


def test_model_inputs_read_dtype_as_scale():
    uint8 = np.full((2, 28, 28), 255, dtype=np.uint8)
    assert torch.equal(as_inputs(uint8), torch.ones(2, 1, 28, 28))
    assert torch.equal(as_inputs(uint8 / 255.0), torch.ones(2, 1, 28, 28))
    assert torch.equal(as_inputs(pd.DataFrame(uint8.reshape(2, -1))), torch.ones(2, 1, 28, 28))
    with pytest.raises(ValueError, match="28x28"):
        as_inputs(np.zeros((2, 27, 28)))


@pytest.mark.parametrize("pixels, allowed", [
    (np.full((1, 28, 28), 300), "integer pixels must be within 0-255"),
    (np.full((1, 28, 28), -1), "integer pixels must be within 0-255"),
    (np.full((1, 28, 28), -0.5), "float pixels must be within 0-1"),
    (np.full((1, 28, 28), 255.0), "float pixels must be within 0-1"),
    (np.full((1, 28, 28), np.nan), "float pixels must be within 0-1"),
])
def test_pixels_out_of_range_are_refused_saying_the_range(pixels, allowed):
    with pytest.raises(ValueError, match=allowed):
        as_inputs(pixels)
    # What the scoring server answers HTTP 400 with, its message saying the range.
    served = ServedClassifier(SimpleNamespace(predict=lambda batch, params: as_inputs(batch)))
    with pytest.raises(mlflow.exceptions.MlflowException, match=allowed) as refused:
        served.predict(pixels)
    assert refused.value.get_http_status_code() == 400


def test_evaluate_writes_test_metrics_on_its_run_and_the_training_run(trained):
    for lr, run_id in trained.runs.items():
        evaluation = trained.evaluations[lr]
        training = trained.client.get_run(run_id)
        assert evaluation.info.status == "FINISHED"
        assert evaluation.data.tags["data_digest"] == training.data.tags["data_digest"]
        for metric in ("test_accuracy", "test_loss"):
            assert training.data.metrics[metric] == pytest.approx(evaluation.data.metrics[metric])


def test_search_logged_models_ranks_the_models_by_val_accuracy_and_shows_their_test_metrics(trained):
    models = mlflow.search_logged_models(
        experiment_ids=["0"], order_by=[{"field_name": f"metrics.{JUDGED_BY}", "ascending": False}],
        output_format="list",
    )
    assert {m.source_run_id for m in models} == set(trained.runs.values())
    for model in models:
        metrics = {m.key: m for m in model.metrics}
        training = trained.client.get_run(model.source_run_id)
        assert metrics["val_accuracy"].value == training.data.metrics["best_val_accuracy"]
        evaluation = trained.evaluations[float(training.data.params["lr"])]
        assert metrics["test_accuracy"].value == evaluation.data.metrics["test_accuracy"]
        assert metrics["test_accuracy"].dataset_name == "fashion-mnist-test"
        assert metrics["test_accuracy"].run_id == evaluation.info.run_id
    ranked = [m.source_run_id for m in models]
    assert ranked == sorted(ranked, key=lambda r: -trained.client.get_run(r).data.metrics["best_val_accuracy"])


def test_evaluation_artifacts_agree_with_test_accuracy(trained):
    for lr, evaluation in trained.evaluations.items():
        run_id = evaluation.info.run_id
        artifacts = {a.path for a in trained.client.list_artifacts(run_id)}
        assert {"confusion_matrix.png", "confusion_matrix.csv", "per_class_metrics.csv", "per_class_metrics.json",
                "misclassified.png", "predictions.csv", "learning_curves.png"} <= artifacts
        # The curves drawn are the scored model's training: its two epochs, as its run logged them.
        training = trained.client.get_run(trained.runs[lr])
        history = epoch_history(trained.runs[lr])
        assert [m["epoch"] for m in history] == [1, 2]
        assert history[-1]["val_loss"] == training.data.metrics["val_loss"]
        assert history[-1]["train_accuracy"] == training.data.metrics["train_accuracy"]
        assert "learning_curves.png" in {a.path for a in trained.client.list_artifacts(trained.runs[lr])}
        confusion = _csv(run_id, "confusion_matrix.csv", index_col=0).to_numpy()
        per_class = _csv(run_id, "per_class_metrics.csv")
        predictions = _csv(run_id, "predictions.csv")
        accuracy = evaluation.data.metrics["test_accuracy"]
        assert np.trace(confusion) / confusion.sum() == pytest.approx(accuracy)
        assert (predictions.label == predictions.predicted).mean() == pytest.approx(accuracy)
        assert per_class["recall"].to_numpy() == pytest.approx(np.diag(confusion) / confusion.sum(axis=1))
        assert per_class["support"].sum() == len(predictions) == 100
        assert list(per_class["class"]) == load_prepared("data", "fashion-mnist").classes


def test_logged_model_is_a_network_and_a_pyfunc_that_agrees_with_evaluate(trained, monkeypatch):
    run_id = trained.runs[LRS[0]]
    uri = model_uri(run_id)
    assert isinstance(mlflow.pytorch.load_model(uri), Network)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle"):
        mlflow.pytorch.load_model(uri)  # the Network face is a pickle ...
    model = mlflow.pyfunc.load_model(uri)  # ... the pyfunc face is built from the weights alone
    assert model.metadata.signature.outputs.input_names() == ["class_index"]
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    data = load_prepared("data", "fashion-mnist")
    images = data.splits["test"].images.numpy()
    expected = _csv(trained.evaluations[LRS[0]].info.run_id, "predictions.csv")["predicted"].to_numpy()
    for batch in (images, images / np.float32(255), pd.DataFrame(images.reshape(len(images), -1))):
        np.testing.assert_array_equal(model.predict(batch).to_numpy(), expected)
        answer = model.predict(batch, params={"output": "named"})
        np.testing.assert_array_equal(answer["class_index"].to_numpy(), expected)
        assert list(answer["class_name"]) == [data.classes[i] for i in expected]


def test_evaluate_refuses_data_the_model_was_not_trained_against(trained, capsys):
    assert prepare.cli(["--source", str(trained.source), "--data-dir", "other", "--seed", "7"]) == 0
    run_id = trained.runs[LRS[0]]
    before = len(MlflowClient().search_runs(["0"]))
    assert evaluate.cli(["--model-uri", run_id, "--data-dir", "other"]) == 2  # bad input: other data
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate: error: data digest mismatch") and "\n" not in err, err
    assert len(MlflowClient().search_runs(["0"])) == before  # refused before an evaluation run started


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-uri", "runs:/0123456789abcdef/model"], "evaluate: error: model_uri: no model at"),
        (["--model-uri", "models:/no-such-model/1"], "evaluate: error: model_uri: no model at"),
        (["--model-uri", "RUN", "--data-dir", "missing"], "evaluate: error: data_dir: no prepared fashion-mnist data in missing"),
        (["--split", "train", "--model-uri", "RUN"], "evaluate: error: split: unknown value 'train'"),
    ],
)
def test_evaluate_bad_input_is_one_line(trained, capsys, args, message):
    args = [trained.runs[LRS[0]] if a == "RUN" else a for a in args]
    assert evaluate.cli(args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_champion_moves_only_to_a_better_validated_version(trained):
    by_val = sorted(trained.runs.values(), key=lambda r: trained.client.get_run(r).data.metrics["best_val_accuracy"])
    worse, better = (f"runs:/{run_id}/model" for run_id in by_val)
    assert register_and_promote(worse, "cnn") == (1, True)
    assert register_and_promote(better, "cnn") == (2, True)
    assert register_and_promote(worse, "cnn") == (3, False)
    assert int(trained.client.get_model_version_by_alias("cnn", "champion").version) == 2
    assert evaluate.cli(["--model-uri", "models:/cnn@champion", "--register", "cnn-evaluated"]) == 0
    assert trained.client.get_model_version_by_alias("cnn-evaluated", "champion").run_id == by_val[1]


def test_compare_and_the_champion_rule_judge_a_model_by_the_same_figure(trained):
    board = compare.main(CompareConfig(output="same.csv"))  # ranked by its default column
    assert list(board["run_id"]) == sorted(trained.runs.values(), key=lambda r: -_judged(r))
    for run_id, figure in zip(board["run_id"], board[RANKING_METRIC]):
        assert figure == _judged(run_id) == trained.client.get_run(run_id).data.metrics["best_val_accuracy"]


def _judged(run_id: str) -> float:
    """The champion rule's figure for the run's model."""
    (output,) = MlflowClient().get_run(run_id).outputs.model_outputs
    return judged_value(output.model_id, run_id)


def test_compare_ranks_runs_by_the_chosen_metric(trained, capsys):
    best = max(trained.runs, key=lambda lr: trained.client.get_run(trained.runs[lr]).data.metrics["test_accuracy"])
    assert compare.cli(["--sort-by", "test_accuracy", "--output", "board.csv", "--plot", "true"]) == 0
    board = pd.read_csv("board.csv")
    assert board["lr"].iloc[0] == best and set(board["lr"]) >= set(LRS)
    assert list(board.columns) == ["run_id", "run_name", "dataset", "kind", "lr", "batch_size", "epochs",
                                   "model_val_accuracy", "test_accuracy", "train_time_s"]
    assert (trained.work / "board.png").stat().st_size > 0
    assert "model_val_accuracy" in capsys.readouterr().out
    assert compare.cli(["--sort-by", "nope"]) == 2
