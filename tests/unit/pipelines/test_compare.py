"""compare with runs of several datasets: a dataset column, ranks within each dataset, one line saying so.

The runs are written straight into the store, with what compare reads of a train run or a trial."""
import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cnnexp.tracking import tags
from pipelines import compare

MIXED = "runs of 3 datasets (fashion-mnist 2, fashion-mnist-sample 1, mnist 2): ranked within each dataset, never across"


def _finished_run(val_accuracy: float, dataset_tag: str | None = None, dataset_param: str | None = None,
                  run_tags: dict | None = None, lr: float = 0.01) -> str:
    params = {"lr": lr, "batch_size": 100, "epochs": 1, **({"dataset": dataset_param} if dataset_param else {})}
    with mlflow.start_run(tags={**({tags.DATASET: dataset_tag} if dataset_tag else {}), **(run_tags or {})}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({"val_accuracy": val_accuracy, "epoch_time_s": 1.0}, step=1)
    return run.info.run_id


@pytest.fixture
def mixed(workdir):
    """MNIST runs score above Fashion-MNIST ones; a sample run says so in its tag, not its param."""
    return {
        "mnist-a": _finished_run(0.96, "mnist", "mnist"),
        "fashion-a": _finished_run(0.84, "fashion-mnist", "fashion-mnist"),
        "mnist-b": _finished_run(0.90, "mnist", "mnist"),
        "fashion-b": _finished_run(0.80, "fashion-mnist", "fashion-mnist"),
        "sample": _finished_run(0.99, "fashion-mnist-sample", "fashion-mnist"),
    }


def test_runs_of_several_datasets_rank_within_their_dataset_and_one_line_says_so(mixed, capsys):
    assert compare.cli(["--output", "board.csv"]) == 0
    board = pd.read_csv("board.csv")
    by_id = {run_id: name for name, run_id in mixed.items()}
    assert [by_id[r] for r in board["run_id"]] == ["fashion-a", "fashion-b", "sample", "mnist-a", "mnist-b"]
    assert list(board["dataset"]) == ["fashion-mnist"] * 2 + ["fashion-mnist-sample"] + ["mnist"] * 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == MIXED
    assert lines[2].split()[:3] == ["run_id", "run_name", "dataset"]


def test_any_columns_ranking_is_within_each_dataset_too(mixed):
    board = compare.main(compare.CompareConfig(sort_by="run_id"))
    for _, group in board.groupby("dataset", sort=False):
        assert list(group["run_id"]) == sorted(group["run_id"])
    assert list(board["dataset"]) == sorted(board["dataset"])


def test_runs_of_one_dataset_get_no_such_line(workdir, capsys):
    _finished_run(0.8, "fashion-mnist", "fashion-mnist")
    _finished_run(0.9, "fashion-mnist", "fashion-mnist", lr=0.001)
    assert compare.cli([]) == 0
    out = capsys.readouterr().out
    assert "datasets" not in out and "fashion-mnist" in out


def test_a_trial_has_its_studys_dataset(workdir):
    with mlflow.start_run(run_name="tune-s") as parent:
        mlflow.log_param("dataset", "mnist")
    trial = _finished_run(0.9, run_tags={tags.TRIAL_NUMBER: "0", "mlflow.parentRunId": parent.info.run_id})
    old = _finished_run(0.7)  # from before runs named their dataset: ranked apart, under ""
    board = compare.main(compare.CompareConfig(include_trials=True)).set_index("run_id")
    assert board.loc[trial, "dataset"] == "mnist" and board.loc[trial, "kind"] == "trial"
    assert board.loc[old, "dataset"] == ""
    assert MlflowClient().get_run(trial).data.tags.get(tags.DATASET) is None  # the parent's, not its own
