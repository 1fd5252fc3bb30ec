"""Real processes: Ctrl-C and SIGKILL under `mlflow run`, then resume; three trainings at once in one directory."""
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
from mlflow.tracking import MlflowClient

from helpers import REPO, metric_histories, mlflow_run_command, subprocess_env, write_idx_dir
from pipelines.flags import flag


def _runs(work):
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return MlflowClient().search_runs(experiment_ids=["0"], order_by=["attributes.start_time ASC"])


def _final_status(run_id, wait_s=60):
    """The status once our helper has undone `mlflow run`'s late FAILED (mlflow_private.keep_killed_after_mlflow_run)."""
    deadline = time.monotonic() + wait_s
    while (status := MlflowClient().get_run(run_id).info.status) != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def test_ctrl_c_under_mlflow_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    work, env = tmp_path / "work", {**subprocess_env(tmp_path / "work"), "PYTHONUNBUFFERED": "1"}
    source = write_idx_dir(tmp_path / "idx", n_train=1500)
    paths = {"data_dir": work / "data", "checkpoint_dir": work / "checkpoints"}
    params = {"epochs": 4, "batch_size": 50, "device": "cpu", "source": source}
    # The uninterrupted run, in a directory and store of its own, trains while the interrupted one and its
    # resume run (each mostly one core's worth of imports): what it logs is the reference, not when.
    alone = tmp_path / "straight"
    alone.mkdir()
    work.mkdir()
    straight_log = alone / "output.log"
    with straight_log.open("w") as log:
        straight = subprocess.Popen(mlflow_run_command("train", **params, data_dir=alone / "data",
                                                       checkpoint_dir=alone / "checkpoints"),
                                    cwd=alone, env=subprocess_env(alone), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    params |= paths
    try:
        # Ctrl-C in a terminal signals the whole foreground process group: mlflow run, bash and python.
        proc = subprocess.Popen(
            mlflow_run_command("train", **params), cwd=work, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        for line in proc.stdout:
            if line.startswith("epoch"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        output = line + proc.communicate(timeout=300)[0]
        assert proc.returncode != 0
        (stopped,) = _runs(work)
        assert _final_status(stopped.info.run_id) == "KILLED", output[-3000:]
        pointer = json.loads((work / "checkpoints" / stopped.info.run_id / "checkpoint.json").read_text())
        assert 1 <= pointer["epoch"] < 4, "the interrupt should land mid-training"

        done = subprocess.run(
            mlflow_run_command("train", resume=stopped.info.run_id, device="cpu", **paths),
            cwd=work, env=env, capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        resumed, record = _runs(work)
        assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
        assert record.data.tags["resumed_into"] == stopped.info.run_id and record.info.status == "FINISHED"
        assert MlflowClient().get_run(resumed.info.run_id).outputs.model_outputs  # the resumed run logged its model
        got = metric_histories(resumed.info.run_id)
        assert straight.wait(timeout=300) == 0, straight_log.read_text()[-2000:]
        (first,) = _runs(alone)
        assert first.info.status == "FINISHED"
        assert got == metric_histories(first.info.run_id)  # exact, step by step
    finally:
        if straight.poll() is None:  # the test failed before it ended: nothing it started outlives it
            os.killpg(straight.pid, signal.SIGKILL)
            straight.wait()


def test_a_train_run_killed_with_sigkill_stays_running_and_resumes_as_its_process_is_gone(tmp_path):
    work, env = tmp_path, {**subprocess_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    paths = {"data_dir": tmp_path / "data", "checkpoint_dir": tmp_path / "checkpoints"}
    params = {"epochs": 4, "batch_size": 50, "device": "cpu", "source": write_idx_dir(tmp_path / "idx"), **paths}
    proc = subprocess.Popen(mlflow_run_command("train", **params), cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch   2/"):
            os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: nothing can end the run
            break
    proc.wait(timeout=60)
    (killed,) = _runs(work)
    assert killed.info.status == "RUNNING"
    listed = subprocess.run([sys.executable, "-m", "pipelines.cli", "orphans"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert killed.info.run_id in listed.stdout and "(dead)" in listed.stdout, listed.stdout + listed.stderr

    done = subprocess.run(mlflow_run_command("train", resume=killed.info.run_id, device="cpu", **paths), cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = MlflowClient().get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.outputs.model_outputs
    assert sorted(step for step, _ in metric_histories(resumed.info.run_id)["val_accuracy"]) == [1, 2, 3, 4]


def _module_command(entry, **params):
    """`python -m pipelines.<entry>`, as `cnnexp <entry>` runs it, with the same flags as `mlflow run`."""
    return [sys.executable, "-m", f"pipelines.{entry}"] + [a for k, v in params.items() for a in (flag(k), str(v))]


def test_three_trainings_at_once_in_one_directory_lose_nothing(tmp_path):
    """All three prepare the data and create the store at the same time.

    (Three `mlflow run`s cannot create a store together: their own process, not ours, migrates the
    tables and races. The README says to create it first; once it exists they share it like these.)
    """
    work, env = tmp_path, {**subprocess_env(tmp_path), "PYTHONPATH": str(REPO)}
    source = write_idx_dir(tmp_path / "idx")
    # `mlflow run` runs in the project checkout, so relative paths would land there.
    paths = {"data_dir": tmp_path / "data", "checkpoint_dir": tmp_path / "checkpoints"}
    procs = [
        subprocess.Popen(
            _module_command("train", epochs=3, batch_size=50, seed=seed, device="cpu", source=source, **paths),
            cwd=work, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for seed in range(3)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert "database is locked" not in output
    runs = _runs(work)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert all([s for s, _ in h] == [1, 2, 3] for h in metric_histories(run.info.run_id).values())
    assert len({r.data.tags["data_digest"] for r in runs}) == 1
