"""cnnexp.tuning.recovery: trials whose worker died end FAILED in both stores and are queued again."""
import os
import socket
import subprocess
import sys

import mlflow
from mlflow.tracking import MlflowClient

from cnnexp.config import TuneConfig
from cnnexp.tracking.runs import start_child_run
from cnnexp.tuning.recovery import recover_dead_trials
from cnnexp.tuning.study import load_study


def test_trials_a_dead_worker_left_running_end_failed_in_both_stores_and_are_queued_again(workdir):
    config = TuneConfig(storage=str(workdir / "optuna-journal.log"))
    study = load_study(config)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    workers = {"dead": {"host": socket.gethostname(), "pid": gone.pid},
               "alive": {"host": socket.gethostname(), "pid": os.getpid()},
               "elsewhere": {"host": "another-machine", "pid": gone.pid}}  # cannot be checked from here
    with mlflow.start_run() as parent_run:
        trials = {}
        for name, worker in workers.items():
            trial = trials[name] = study.ask()
            trial.suggest_float("lr", 1e-3, 1e-1, log=True)
            run_id = start_child_run(parent_run.info.run_id, parent_run.info.experiment_id, name, {}, {})
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("worker", worker)
        assert recover_dead_trials(study) == [trials["dead"].number]
    states = {t.number: t.state.name for t in study.trials}
    dead = trials["dead"].number
    assert states == {dead: "FAIL", trials["alive"].number: "RUNNING", trials["elsewhere"].number: "RUNNING", 3: "WAITING"}
    retry = study.trials[3]
    assert retry.system_attrs["fixed_params"] == study.trials[dead].params and retry.user_attrs["retry_of"] == dead
    run = MlflowClient().get_run(study.trials[dead].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "worker process died" in run.data.tags["error"]


