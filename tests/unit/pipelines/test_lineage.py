"""Every run says which code made it: runs `cnnexp` starts and every trial's child run carry the source
tags `mlflow run` gives its runs."""
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from helpers import REPO, write_idx_dir
from pipelines import train, tune


def _head() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode:
        pytest.skip("not a git checkout")
    return done.stdout.strip()


def test_train_runs_and_trial_runs_name_their_source_and_commit(workdir, tmp_path):
    source = ["--source", str(write_idx_dir(tmp_path / "idx", n_train=200, n_test=50))]
    assert train.cli(["--epochs", "1", *source]) == 0
    assert tune.cli(["--n-trials", "1", "--epochs", "1", "--batch-min", "64", "--batch-max", "64", *source]) == 0
    runs = MlflowClient().search_runs(["0"])
    assert {r.info.run_name.split("-")[0] for r in runs} == {"train", "tune", "trial"}
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == _head(), run.info.run_name
        assert tags["mlflow.source.type"] == "PROJECT" and tags["mlflow.source.name"], run.info.run_name
