"""deploy/slurm/worker-array.sbatch on a real single-node SLURM (slurmctld + slurmd + munged on this machine, as
root), against the session's PostgreSQL and MLflow server. Skips, saying why, where SLURM cannot start."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import REPO, assert_optuna_and_mlflow_agree, children, cluster_env, create_study, free_port

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
SLURM_CONF = """\
ClusterName=cnnexp-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
# No cgroups, accounting or MPI: the least a container's root can start.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# `sbatch --wait` sleeps 2 s, then 8, then 32 between its looks at the job while that sleep is under half of
# MinJobAge (default 300): a 20 s job was seen done only at 42 s. At 4 it looks every 2 s, and a finished
# job's record stays at least 4 s, so no look can miss it (sbatch's own rule for how fast it may poll).
MinJobAge=4
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def log_tail(directory: Path) -> str:
    return " | ".join(f"{p.name}: {p.read_text().strip().splitlines()[-1:]}" for p in sorted(directory.glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM on loopback, its own munge key and socket; yields what its commands need in their
    environment (only that: this process's own environment holds other tests' MLFLOW_TRACKING_URI by then)."""
    if os.geteuid() != 0:
        pytest.skip("SLURM's daemons run as root here, and this is not root")
    missing = [d for d in (*DAEMONS, shutil.which("sbatch") or "sbatch") if not os.path.exists(d)]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    directory = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (directory / sub).mkdir()
    key = directory / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=os.uname().nodename.split(".")[0], dir=directory, cpus=os.cpu_count(),
                                      ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    try:
        munged = subprocess.run([DAEMONS[0], "--force", f"--socket={directory}/munge.sock", f"--key-file={key}",
                                 f"--log-file={directory}/munged.log", f"--pid-file={directory}/munged.pid",
                                 f"--seed-file={directory}/munged.seed"], capture_output=True, text=True)
        started.append(directory / "munged.pid")
        for daemon in DAEMONS[1:]:
            subprocess.run([daemon], env=env, capture_output=True, timeout=60)
            started.append(directory / f"{Path(daemon).name}.pid")
        if not node_idle(env):
            pytest.skip(f"SLURM did not start here (munged exit {munged.returncode}; {log_tail(directory)})")
        yield {"SLURM_CONF": str(conf)}
    finally:
        for pid_file in reversed(started):
            stop(pid_file)


def node_idle(env: dict, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if state.stdout.strip() == "idle":
            return True
        time.sleep(1)
    return False


def stop(pid_file: Path) -> None:
    """SIGTERM to the daemon that wrote pid_file, and wait (up to 10 s) until it is gone."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)


@pytest.mark.postgres
def test_a_slurm_array_of_workers_runs_the_study_to_its_trial_count(slurm, cluster, tmp_path, monkeypatch):
    _, study = create_study(cluster, tmp_path, "slurm-array", n_trials=4, epochs=1, monkeypatch=monkeypatch)
    # What a user exports before sbatch (docs/scale-out.md); the command runs from this checkout.
    env = {**cluster_env(cluster, tmp_path), **slurm, "OPTUNA_STORAGE": cluster["OPTUNA_STORAGE"],
           "STUDY_NAME": "slurm-array", "CNNEXP_SOURCE": str(tmp_path / "idx"), "TMPDIR": str(tmp_path),
           "CNNEXP": f"{sys.executable} -m pipelines.cli"}
    started = time.monotonic()
    # One CPU each, so both tasks run at once on a 2-core node; a trial at a time, so both get trials to run.
    done = subprocess.run(["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/task-%a.log",
                           str(REPO / "deploy" / "slurm" / "worker-array.sbatch"), "--cohort", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    logs = [(tmp_path / f"task-{i}.log").read_text() if (tmp_path / f"task-{i}.log").exists() else "" for i in (0, 1)]
    print(f"4 trials on a 2-task SLURM array: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(log[-2000:] for log in logs)
    for i, log in enumerate(logs):
        assert log.startswith(f"task {i} on ") and "joined study 'slurm-array'" in log and "study now:" in log

    trials = study.get_trials()
    # Two workers that count at once may both start the last trial the study lacks: one more than asked, not fewer.
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) in (4, 5)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = MlflowClient(tracking_uri=cluster["MLFLOW_TRACKING_URI"])
    parent, runs = children(client, study)
    assert_optuna_and_mlflow_agree(study, runs, client)
    assert parent.info.status == "FINISHED"  # the worker that saw the study reach its count ended the parent
