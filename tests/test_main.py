"""main: prepare -> train -> evaluate as child runs, with finished steps reused rather than rerun."""
import dataclasses
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cnnexp import tracking
from cnnexp.config import TrainConfig
from conftest import REPO, subprocess_env
from pipelines import main


def _runs(**tags):
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return MlflowClient().search_runs(["0"], filter_string=query, order_by=["attributes.start_time ASC"])


def test_main_chains_steps_as_children_and_reuses_them_by_value(workdir, idx_source):
    steps = main.main(main.MainConfig(source=str(idx_source), epochs=1, lr=0.01, batch_size=50))
    (parent,) = _runs(**{"mlflow.runName": "main"})
    for step, run_id in steps.items():
        child = MlflowClient().get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["cnnexp.step"] == step and child.info.status == "FINISHED"
    evaluation = MlflowClient().get_run(steps["evaluate"])
    assert evaluation.data.tags["scored_run_id"] == steps["train"] and "test_accuracy" in evaluation.data.metrics

    assert main.cli(["--source", str(idx_source), "--epochs", "1", "--lr", "1e-2", "--batch-size", "50"]) == 0
    (_, again) = _runs(**{"mlflow.runName": "main"})
    assert again.data.tags["reused_steps"] == "prepare,train,evaluate"
    assert main.main(main.MainConfig(source=str(idx_source), epochs=1, lr=1e-2, batch_size=50)) == steps
    assert len(_runs(**{"cnnexp.step": "train"})) == 1

    # A changed training input reruns train and evaluate, not prepare.
    changed = main.main(main.MainConfig(source=str(idx_source), epochs=2, lr=0.01, batch_size=50))
    assert changed["prepare"] == steps["prepare"] and changed["train"] != steps["train"]
    assert changed["evaluate"] != steps["evaluate"]


def test_params_logged_as_strings_compare_by_value():
    config = TrainConfig(lr=0.01, batch_size=50)
    logged = {k: str(v) for k, v in dataclasses.asdict(config).items()}
    assert tracking.same_params({**logged, "lr": "1e-2", "batch_size": "50"}, config)
    assert not tracking.same_params({**logged, "lr": "0.02"}, config)
    assert not tracking.same_params({**logged, "batch_size": "fifty"}, config)
    assert not tracking.same_params({k: v for k, v in logged.items() if k != "seed"}, config)


def test_code_version_changes_with_the_code(tmp_path, monkeypatch):
    before = main.code_version()
    fake_repo = tmp_path / "repo"
    (fake_repo / "cnnexp").mkdir(parents=True)
    (fake_repo / "cnnexp" / "x.py").write_text("a = 1\n")
    monkeypatch.setattr(main, "REPO", fake_repo)
    first = main.code_version()
    (fake_repo / "cnnexp" / "x.py").write_text("a = 2\n")
    assert len({before, first, main.code_version()}) == 3


@pytest.mark.slow
def test_mlflow_run_main_twice_does_the_expensive_steps_once(tmp_path, idx_source):
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "main", "--env-manager", "local",
            "-P", f"source={idx_source}", "-P", f"data_dir={tmp_path / 'data'}", "-P", "epochs=1"]
    for _ in range(2):
        done = subprocess.run(args, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = _runs(**{"mlflow.project.entryPoint": "main"})
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
    assert parents[0].data.tags["reused_steps"] == "none"
    assert parents[1].data.tags["reused_steps"] == "prepare,train,evaluate"
    for step in ("prepare", "train", "evaluate"):
        (run,) = _runs(**{"cnnexp.step": step})
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
