"""main: prepare -> train -> evaluate as child runs, with finished steps reused rather than rerun."""
import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from cnnexp.config import TrainConfig
from cnnexp.tracking import log
from cnnexp.tracking.queries import same_params
from pipelines import evaluate as evaluate_module
from pipelines import main
from pipelines import prepare as prepare_module


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
    assert same_params({**logged, "lr": "1e-2", "batch_size": "50"}, config)
    assert not same_params({**logged, "lr": "0.02"}, config)
    assert not same_params({**logged, "batch_size": "fifty"}, config)
    assert not same_params({k: v for k, v in logged.items() if k != "seed"}, config)


def test_code_version_changes_with_the_code(tmp_path, monkeypatch):
    before = main.code_version()
    fake_repo = tmp_path / "repo"
    (fake_repo / "cnnexp").mkdir(parents=True)
    (fake_repo / "cnnexp" / "x.py").write_text("a = 1\n")
    monkeypatch.setattr(main, "REPO", fake_repo)
    first = main.code_version()
    (fake_repo / "cnnexp" / "x.py").write_text("a = 2\n")
    second = main.code_version()
    (fake_repo / "cnnexp" / "tracking").mkdir()
    (fake_repo / "cnnexp" / "tracking" / "log.py").write_text("b = 1\n")  # a subpackage's module counts too
    assert len({before, first, second, main.code_version()}) == 4


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("step", ["prepare", "train", "evaluate"])
def test_main_interrupted_at_a_step_ends_it_and_main_killed_and_the_next_main_goes_on(step, workdir, idx_source,
                                                                                       monkeypatch, capsys):
    # prepare: while reading the data; train: at its first epoch's metrics; evaluate: while scoring.
    target = {"prepare": (prepare_module, "prepare"), "train": (log, "log_epoch"), "evaluate": (evaluate_module, "predict")}
    monkeypatch.setattr(*target[step], _interrupt)
    args = ["--source", str(idx_source), "--epochs", "1", "--batch-size", "50"]
    assert main.cli(args) == 130
    assert "interrupted; the run is marked KILLED" in capsys.readouterr().err
    (parent,) = _runs(**{"mlflow.runName": "main"})
    assert parent.info.status == "KILLED"
    children = MlflowClient().search_runs(["0"], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.info.run_name.split("-")[0]: r.info.status for r in children}[step] == "KILLED"
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    assert main.cli(args) == 0
    (_, again) = _runs(**{"mlflow.runName": "main"})
    done_before = {"prepare": "none", "train": "prepare", "evaluate": "prepare,train"}[step]
    assert again.info.status == "FINISHED" and again.data.tags["reused_steps"] == done_before
