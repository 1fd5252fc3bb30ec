"""cnnexp.tracking.owners and resume: a RUNNING train run is continued only once its process is known gone,
and such orphans, and other runs of cnnexp whose process is gone, can be listed and ended."""
import os
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from cnnexp.checks import ConfigError
from cnnexp.tracking import tags
from cnnexp.tracking.owners import orphaned_runs
from cnnexp.tracking.resume import resumable_run
from pipelines import orphans


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    return gone.pid


def _running_train_run(host: str, pid: int, silent_s: float, more_tags: dict | None = None) -> str:
    client = MlflowClient()
    run = client.create_run("0", tags={tags.ENTRY_POINT: "train", tags.OWNER_HOST: host, tags.OWNER_PID: str(pid),
                                       tags.HEARTBEAT: f"{time.time() - silent_s:.0f}", **(more_tags or {})})
    return run.info.run_id


def test_a_running_run_is_resumed_only_once_its_process_is_gone(workdir):
    here = socket.gethostname()
    dead = _running_train_run(here, _dead_pid(), 5)
    alive = _running_train_run(here, os.getpid(), 5)
    silent = _running_train_run("another-machine", 123, 3600)
    beating = _running_train_run("another-machine", 123, 5)
    assert resumable_run(dead).info.run_id == dead
    with pytest.raises(ConfigError, match="its process is still running here"):
        resumable_run(alive)
    with pytest.raises(ConfigError, match="resume with take_over=true"):
        resumable_run(silent)
    assert resumable_run(silent, take_over=True).info.run_id == silent
    with pytest.raises(ConfigError, match="has sent a heartbeat lately"):
        resumable_run(beating, take_over=True)
    assert {run.info.run_id for run, _ in orphaned_runs()} == {dead, silent}


def test_other_runs_whose_process_died_here_are_orphans_but_not_silent_ones_elsewhere(workdir):
    # Only a train run beats every epoch: another run silent elsewhere may still be at work.
    here, other = {tags.ENTRY_POINT: "evaluate"}, {tags.ENTRY_POINT: "prepare"}
    dead = _running_train_run(socket.gethostname(), _dead_pid(), 5, here)
    _running_train_run("another-machine", 123, 3600, other)
    _running_train_run(socket.gethostname(), _dead_pid(), 5, {tags.STUDY_STATUS: tags.STUDY_WAITING})  # workers finish it
    MlflowClient().create_run("0")  # no owner: not cnnexp's to judge
    assert [run.info.run_id for run, _ in orphaned_runs()] == [dead]


def test_orphans_are_listed_and_ended_failed_with_the_reason(workdir, capsys):
    dead = _running_train_run(socket.gethostname(), _dead_pid(), 5)
    assert orphans.cli([]) == 0
    out = capsys.readouterr().out
    assert dead in out and "(dead)" in out and "1 orphaned run(s) found" in out
    assert MlflowClient().get_run(dead).info.status == "RUNNING"  # listing changes nothing
    assert orphans.cli(["--end", "true"]) == 0
    run = MlflowClient().get_run(dead)
    assert run.info.status == "FAILED" and run.data.tags[tags.ERROR].startswith("orphaned: its process is gone")
    assert resumable_run(dead).info.run_id == dead
