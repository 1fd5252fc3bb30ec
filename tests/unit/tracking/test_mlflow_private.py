"""What cnnexp.tracking.mlflow_private leans on in MLflow (3.17.2). If one of these fails, MLflow has moved:
redo or drop the workaround in the same change that bumps MLflow."""
import inspect

import mlflow.projects
from mlflow.entities import RunStatus


def test_mlflow_run_still_compares_a_status_string_with_run_status_ints():
    # The reason for keep_killed_after_mlflow_run: `mlflow run` re-marks an ended run FAILED because this is False.
    assert RunStatus.is_terminated("KILLED") is False
    source = inspect.getsource(mlflow.projects._maybe_set_run_terminated)
    assert "RunStatus.is_terminated(cur_status)" in source and "get_run(run_id).info.status" in source
