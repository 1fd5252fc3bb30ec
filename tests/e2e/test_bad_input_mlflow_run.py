"""Bad input through `mlflow run`: MLflow passes every -P value as text; the run it created ends FAILED with
our one line as its reason, named after its entry point."""
import subprocess

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from helpers import mlflow_run_command, subprocess_env


# The string-typed path: MLflow passes every -P value as text and checks neither ints nor floats (the
# other refusals are the same code in-process: tests/unit/pipelines/test_bad_input.py).
MLFLOW_RUN_CASES = {
    "prepare val_fraction text": ("prepare", {"val_fraction": "abc"}, "val_fraction: invalid float value: 'abc'"),
    # MLflow passes an unknown -P name on as `--epoch 1`: refused, not read as --epochs.
    "train mistyped -P name": ("train", {"epoch": "1"}, "unknown parameter -P epoch"),
}


@pytest.mark.parametrize("case", MLFLOW_RUN_CASES)
def test_bad_input_through_mlflow_run_fails_its_run_with_one_line(case, tmp_path):
    entry, params, message = MLFLOW_RUN_CASES[case]
    done = subprocess.run(
        mlflow_run_command(entry, data_dir=tmp_path / "data", **params),
        cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith(f"{entry}: ")]
    assert len(ours) == 1 and message in ours[0], done.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and message in run.data.tags["error"]
    assert run.info.run_name == entry  # not MLflow's random name
    assert not (tmp_path / "data").exists()
