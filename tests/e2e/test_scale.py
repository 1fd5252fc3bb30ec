"""Scale out for real: worker processes on PostgreSQL Optuna storage and an `mlflow server` on loopback
(marked postgres), and a SIGKILLed worker on the default local stores."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (INITDB, REPO, assert_optuna_and_mlflow_agree, children, cluster_env, cnnexp, create_study,
                     model_uri, subprocess_env, write_idx_dir)
from cnnexp.tuning.study import open_storage
from pipelines import tune, worker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# The heartbeat's timing, shortened for the workers of a test that waits for a dead worker's trial to go
# stale: the mechanism is the same, and the 30 s grace period would be most of the test. Beats every 2 s
# against a 12 s grace keep the live workers' trials as safe from a busy machine as 10 s against 30 s.
FAST_HEARTBEAT = """
import cnnexp.tuning.recovery as recovery, cnnexp.tuning.study as study
recovery.HEARTBEAT_INTERVAL_S = study.HEARTBEAT_INTERVAL_S = 2
recovery.GRACE_PERIOD_S = study.GRACE_PERIOD_S = 12
"""

# 16 workers on 2 busy cores: a worker's heartbeat thread can be starved of the CPU for a long while. The
# 16-worker test counts connections and checks that every trial ends, not the grace period, so it waits longer.
LONG_GRACE = """
import cnnexp.tuning.recovery as recovery, cnnexp.tuning.study as study
recovery.GRACE_PERIOD_S = study.GRACE_PERIOD_S = 600
"""


def hook_dir(work: Path, code: str) -> Path:
    """A directory whose sitecustomize runs code in every Python process started with it on PYTHONPATH."""
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(code)
    return hook


def start_worker(cluster, work, common, index, *args, hook: Path | None = None, shared_data: bool = False,
                 threads: int | None = None) -> subprocess.Popen:
    """A `cnnexp worker` process. By default it prepares its own copy of the data, as a separate machine would;
    shared_data: it loads the copy create_study prepared in work/data, as workers on one host (or on a shared
    disk) do. threads: its OMP_NUM_THREADS, its share of this host's cores (scripts/local-cluster.sh's rule).

    At nice 10: with up to 16 of them on 2 cores, the MLflow server and PostgreSQL that every worker waits on,
    and pytest's other test process beside this one, keep their share of the CPU."""
    env = cluster_env(cluster, work, hook) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    data = work / ("data" if shared_data else f"data-{index}")
    return subprocess.Popen(["nice", "-n", "10", *cnnexp("worker", *common, "--data-dir", data, *args)], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --- fast: joining on the default local stores ------------------------------------------------

def test_a_worker_joins_the_study_tune_created_and_runs_until_its_trial_count(workdir, tmp_path, capsys):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    settings = ["--epochs", "1", "--pruner", "none", "--batch-min", "32", "--batch-max", "64"]
    assert tune.cli(["--workers", "0", "--n-trials", "3", *settings, "--source", str(source)]) == 0
    study = optuna.load_study(study_name="cnnexp-tune", storage=open_storage("optuna-journal.log"))
    assert not study.trials and study.user_attrs["target_trials"] == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    waiting = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert (waiting.info.status, waiting.data.tags["study_status"]) == ("RUNNING", "waiting for workers")
    # Another "machine": its own data directory, prepared on first use from the same source.
    assert worker.cli(["--source", str(source), "--data-dir", "data-elsewhere"]) == 0
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state in FINISHED for t in trials)
    parent, runs = children(client, study)
    assert parent.data.tags["mlflow.runName"] == "tune-cnnexp-tune"
    assert_optuna_and_mlflow_agree(study, runs, client)
    # The worker that saw the study reach its target summarised it on the parent and ended it.
    assert (parent.info.status, parent.data.tags["study_status"]) == ("FINISHED", "complete")
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["trials_complete"] == 3
    assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    capsys.readouterr()

    # Settings and data stay the study's: a drifting tune or a worker on other data is refused.
    assert tune.cli(["--workers", "0", "--n-trials", "3", *settings[:-4], "--batch-min", "64", "--source", str(source)]) == 2
    assert "batch_min: study 'cnnexp-tune' was created with batch_min=32, got 64" in capsys.readouterr().err
    other = write_idx_dir(tmp_path / "other", n_train=300, n_test=50)
    assert worker.cli(["--source", str(other), "--data-dir", "data-other"]) == 2
    assert "source: prepared data (digest" in capsys.readouterr().err
    assert worker.cli(["--study-name", "nope"]) == 2
    assert "study_name: no study 'nope' in optuna-journal.log" in capsys.readouterr().err
    assert len(study.get_trials()) == 3


# --- slow: PostgreSQL and an mlflow server ----------------------------------------------------

class ConnectionPeak(threading.Thread):
    """The most client connections PostgreSQL held at once (pg_stat_activity, every 0.2 s) while the block ran."""

    def __init__(self, port: str):
        super().__init__(daemon=True)
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.peak, self.max_connections, self.done = 0, None, threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as db:
            self.max_connections = int(db.execute("SHOW max_connections").fetchone()[0])
            while not self.done.wait(0.2):
                (count,) = db.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                                      " AND pid <> pg_backend_pid()").fetchone()
                self.peak = max(self.peak, count)

    def __enter__(self) -> "ConnectionPeak":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


@pytest.mark.postgres
def test_sixteen_workers_share_a_study_on_one_postgres_and_an_mlflow_server(cluster, tmp_path, monkeypatch):
    """16 worker processes of one trial each on a default PostgreSQL (max_connections 100): each holds a
    connection only while it queries (NullPool), so none is refused with "too many clients"."""
    common, study = create_study(cluster, tmp_path, "sixteen-workers", n_trials=16, epochs=1, monkeypatch=monkeypatch)
    hook = hook_dir(tmp_path, LONG_GRACE)
    started = time.monotonic()
    with ConnectionPeak(cluster["PGPORT"]) as connections:
        # One host's 16 workers: one prepared copy of the data and one thread each (what scripts/local-cluster.sh's
        # `workers` does), not 16 torchvision imports to prepare it and 32 threads on 2 cores. The connections,
        # the server and the trials are what this test is about.
        workers = [start_worker(cluster, tmp_path, common, i, "--n-trials", 1, hook=hook, shared_data=True, threads=1)
                   for i in range(16)]
        outputs = [w.communicate(timeout=500)[0] for w in workers]
    print(f"16 trials on 16 workers: {time.monotonic() - started:.1f} s, at most {connections.peak} of "
          f"{connections.max_connections} connections")
    assert not [o for o in outputs if "too many clients" in o]
    assert connections.peak < connections.max_connections - 3  # 3 are kept for superusers
    assert [w.returncode for w in workers] == [0] * 16, "\n".join(o[-2000:] for o in outputs)
    assert all(o.count("\ntrial ") + o.startswith("trial ") == 1 for o in outputs)

    trials = study.get_trials()
    assert len(trials) == 16 and all(t.state in FINISHED for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 16
    client = MlflowClient(tracking_uri=cluster["MLFLOW_TRACKING_URI"])
    parent, runs = children(client, study)
    assert_optuna_and_mlflow_agree(study, runs, client)
    # Artifacts go through the server: the parent's settings file and a trial's model come back over HTTP.
    settings = client.download_artifacts(parent.info.run_id, "study.json", str(tmp_path))
    assert json.loads(Path(settings).read_text())["study_name"] == "sixteen-workers"
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri(best_run, client), dst_path=str(tmp_path / "model"),
                                                tracking_uri=cluster["MLFLOW_TRACKING_URI"])
    assert (Path(local) / "MLmodel").is_file()


def wait_for_trial_mid_training(study: optuna.Study, pid: int, timeout: float = 300) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            # Its MLflow run made too (the tracker creates it beside training; a slow server can lag an epoch).
            if (trial.user_attrs.get("worker", {}).get("pid") == pid and trial.intermediate_values
                    and "mlflow_run_id" in trial.user_attrs):
                return trial
        time.sleep(0.2)
    raise AssertionError(f"no trial of process {pid} got past its first epoch in {timeout} s")


@pytest.mark.postgres
def test_a_killed_worker_s_trial_is_failed_by_heartbeat_and_retried(cluster, tmp_path, monkeypatch):
    common, study = create_study(cluster, tmp_path, "killed-worker", n_trials=8, epochs=4, monkeypatch=monkeypatch)
    # Until the study has 8; one trial at a time each, so the victim holds exactly one when it dies.
    hook = hook_dir(tmp_path, FAST_HEARTBEAT)
    workers = [start_worker(cluster, tmp_path, common, i, "--cohort", "1", hook=hook, shared_data=True, threads=1)
               for i in range(3)]
    victim = workers[0]
    killed = wait_for_trial_mid_training(study, victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    outputs = [w.communicate(timeout=400)[0] for w in workers[1:]]
    assert [w.returncode for w in workers[1:]] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed.number].state == TrialState.FAIL
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state in FINISHED and retry.params == killed.params
    print(f"killed trial {killed.number} retried as {retry.number}, which ended "
          f"{retry.datetime_complete:%H:%M:%S}; workers done {time.monotonic() - killed_at:.0f} s after the kill")
    assert sum(t.state in FINISHED for t in trials.values()) >= 8
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = MlflowClient(tracking_uri=cluster["MLFLOW_TRACKING_URI"])
    _, runs = children(client, study)
    assert_optuna_and_mlflow_agree(study, runs, client, killed=killed.number)
    stale = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert stale.info.status == "FAILED" and "no heartbeat" in stale.data.tags["error"]
    assert retry.user_attrs["mlflow_run_id"] != stale.info.run_id


# Loaded through PYTHONPATH into the tune to be killed: each stops it where the SIGKILL must land, once the
# writes before it are done (a kill inside a journal write would leave Optuna's file lock, which the next
# writer breaks only after its 30 s grace period), and says so on stdout.
HANGS = {
    # After epoch 1 of 2: both trials have reported it, and the tracker has written their runs and epochs.
    "mid-training": """
import time, cnnexp.tuning.trials as trials
fill = trials.TrialRunner._fill
def _fill(self, engine):
    self.fills = getattr(self, "fills", 0) + 1
    if self.fills == 2:
        self.tracker.drain()
        print("HANGING", flush=True)
        time.sleep(600)
    return fill(self, engine)
trials.TrialRunner._fill = _fill
""",
    # The first model upload: training is over, and the trials are RUNNING until their models are in (the
    # window of a half-finished trial). The training thread is waiting for the tracker within the second.
    "while its model is logged": """
import time, cnnexp.tuning.trials as trials
def log_model_and_finish(run_id, *args, **kwargs):
    time.sleep(1)
    print("HANGING", flush=True)
    time.sleep(600)
trials.log_model_and_finish = log_model_and_finish
""",
}


def wait_for_hang(process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if line.startswith("HANGING"):
            return
        assert time.monotonic() < deadline, "the tune never reached the point of its kill"
    raise AssertionError("the tune process ended before the point of its kill")


@pytest.mark.parametrize("when", HANGS)
def test_a_killed_tune_s_trial_is_failed_and_retried_by_the_next_tune_on_the_journal(when, workdir, tmp_path):
    source = write_idx_dir(tmp_path / "idx", n_train=200, n_test=50)
    epochs = "2" if when == "mid-training" else "1"
    args = ["--epochs", epochs, "--pruner", "none", "--sampler", "random", "--cohort", "2", "--source", str(source)]
    hook = hook_dir(tmp_path, "import cnnexp.tracking\n" + HANGS[when])
    env = {**subprocess_env(workdir), "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    first = subprocess.Popen(cnnexp("tune", "--n-trials", "2", *args), cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for_hang(first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    journal = str(workdir / "optuna-journal.log")
    study = optuna.load_study(study_name="cnnexp-tune", storage=open_storage(journal))
    killed = study.get_trials()
    # Neither trial counts as complete: a trial is complete only once its model is in.
    assert [t.state for t in killed] == [TrialState.RUNNING] * 2
    if when == "mid-training":
        assert [sorted(t.intermediate_values) for t in killed] == [[1], [1]]

    assert tune.cli(["--n-trials", "2", *args]) == 0  # the next tune recovers both and runs them first
    study = optuna.load_study(study_name="cnnexp-tune", storage=open_storage(journal))
    trials = study.get_trials()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    for trial in killed:  # each member of the killed cohort on its own: failed in both stores, retried
        assert trials[trial.number].state == TrialState.FAIL
        (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == trial.number]
        assert retry.state == TrialState.COMPLETE and retry.params == trial.params
        stale = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert stale.info.status == "FAILED" and "worker process died" in stale.data.tags["error"]
        run = client.get_run(retry.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["retry_of"] == str(trial.number)
        mlflow.pytorch.load_model(model_uri(run.info.run_id, client))


@pytest.mark.skipif(not INITDB or os.geteuid() != 0, reason="needs the PostgreSQL server binaries and root "
                                                            "(the cluster then belongs to the postgres user)")
def test_local_cluster_in_a_private_directory_says_in_one_line_why_postgres_cannot_use_it():
    private = Path(tempfile.mkdtemp())  # mode 0700, as `mktemp -d` makes it
    try:
        done = subprocess.run(["bash", str(REPO / "scripts" / "local-cluster.sh"), "up", str(private / "cluster")],
                              capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("local-cluster: user postgres cannot enter") and "chmod o+x" in done.stderr
