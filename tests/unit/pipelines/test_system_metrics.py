"""system_metrics=true turns on MLflow's own monitor for the training run."""
from mlflow.tracking import MlflowClient

from pipelines import train


def _metric_keys() -> set[str]:
    (run,) = MlflowClient().search_runs(experiment_ids=["0"])
    assert run.info.status == "FINISHED"
    return set(run.data.metrics)


def test_system_metrics_are_logged_when_asked(workdir, idx_source, monkeypatch):
    # MLflow samples every 10 s by default and drops the last partial interval; sample often here. A 1-epoch
    # run on tiny data ends within about half a second of the monitor's start (train draws no figure), so one
    # whole interval must fit well inside that.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    assert train.cli(["--epochs", "1", "--source", str(idx_source), "--system-metrics", "true"]) == 0
    system = {k for k in _metric_keys() if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system

