"""compare tells the truth: which metric ranks, which run each row is, trials apart, training time
without the time a run sat interrupted, files only where asked."""
import time

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cnnexp.ranking import RANKING_METRIC
from pipelines import compare


def _run(client, name, lr, val, epoch_times, wall_s=None, tags=None):
    """A finished run as train (or a trial) leaves it: params, per-epoch val_accuracy and epoch_time_s."""
    run = client.create_run("0", run_name=name, tags=tags or {})
    run_id = run.info.run_id
    params = {"lr": lr, "batch_size": 100, "epochs": len(val)}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    now = int(time.time() * 1000)
    metrics = [Metric("val_accuracy", v, now, step) for step, v in enumerate(val, 1)]
    metrics += [Metric("epoch_time_s", t, now, step) for step, t in enumerate(epoch_times, 1)]
    client.log_batch(run_id, metrics=metrics)
    end = run.info.start_time + int(1000 * (wall_s if wall_s is not None else sum(epoch_times)))
    client.set_terminated(run_id, "FINISHED", end_time=end)
    return run_id


@pytest.fixture
def runs(workdir):
    client = MlflowClient()
    return {
        # The same name twice: only the run id tells them apart.
        "fast": _run(client, "train-lr0.01-bs100", 0.01, [0.70, 0.80], [2.0, 2.0]),
        "resumed": _run(client, "train-lr0.01-bs100", 0.003, [0.75, 0.82, 0.85], [3.0, 3.0, 3.0], wall_s=3600),
        "trial": _run(client, "trial-0-lr0.1-bs100", 0.1, [0.90], [1.0], tags={"optuna.trial_number": "0"}),
    }


def test_compare_names_its_metric_shows_run_ids_and_keeps_trials_apart(runs, capsys, workdir):
    table = compare.main(compare.CompareConfig())
    out = capsys.readouterr().out
    # Runs without a LoggedModel are judged by their last epoch's val_accuracy (what they logged).
    assert table["run_id"].tolist() == [runs["resumed"], runs["fast"]]  # 0.85 beats 0.80
    assert table[RANKING_METRIC].tolist() == [0.85, 0.80]
    assert f"by {RANKING_METRIC} (each run's logged model's own val_accuracy: its kept epoch's), best first" in out
    assert "1 tuning trials left out (--include-trials true" in out
    assert runs["resumed"] in out and runs["fast"] in out
    # An hour of wall clock, most of it interrupted: the training time is its epochs' 9 s.
    assert table.set_index("run_id").loc[runs["resumed"], "train_time_s"] == 9.0
    assert list(workdir.iterdir()) == [workdir / "mlflow.db"]  # no file unless asked

    mixed = compare.main(compare.CompareConfig(include_trials=True))
    assert mixed["run_id"].iloc[0] == runs["trial"] and mixed["kind"].iloc[0] == "trial"


def test_compare_writes_files_only_where_asked(runs, workdir, capsys):
    assert compare.cli(["--output", "boards/run1.csv", "--plot", "true"]) == 0
    assert len(pd.read_csv(workdir / "boards" / "run1.csv")) == 2
    assert (workdir / "boards" / "run1.png").stat().st_size > 0
    assert compare.cli(["--plot", "true"]) == 2
    assert "plot: needs output" in capsys.readouterr().err
