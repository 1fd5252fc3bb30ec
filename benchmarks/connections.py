"""How many PostgreSQL connections N `cnnexp worker` processes hold, against the server's max_connections.

    python benchmarks/connections.py --workers 8,16,32                       # this code's pool settings
    python benchmarks/connections.py --workers 32 --pools default,nullpool   # SQLAlchemy's default pool too

It brings up scripts/local-cluster.sh's PostgreSQL and MLflow server (a default PostgreSQL: max_connections
100) in a directory of its own, and for each pool and N: creates a study of N one-epoch trials on the bundled
4,443-image sample, starts N workers of one trial each, and samples pg_stat_activity every 0.2 s until they
are done. It prints, per run, the peak of client connections to the Optuna database, to MLflow's (the
server's own pool: workers track over HTTP), and in all, with the workers alive at that peak, whether any
worker failed (and whether with "too many clients"), and the time. Connections, not speed: on a small machine
N processes importing torch at once take minutes, and say nothing about a cluster's throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from mlflow_server import free_port  # noqa: E402

SAMPLE = REPO / "cnnexp" / "sample_data"
# Each pool variant is set in every worker through a sitecustomize on PYTHONPATH, as the tests set heartbeats.
POOLS = {
    "nullpool": "",  # this code's setting (cnnexp.tuning.study.SERVER_ENGINE_KWARGS)
    "default": "import cnnexp.tuning.study as s; s.SERVER_ENGINE_KWARGS = {}\n",  # SQLAlchemy's 5 + 10 per engine
    "pool1": "import cnnexp.tuning.study as s; s.SERVER_ENGINE_KWARGS = {'pool_size': 1, 'max_overflow': 1}\n",
}
# N workers on a small machine starve each other's heartbeat threads of the CPU for long stretches (the
# figures in docs/scale-out.md were taken while a trial's heartbeat still stopped before its model was
# logged, a gap since closed). Counting connections needs every trial to end, not that race: 10 minutes.
LONG_GRACE = "import cnnexp.tuning.recovery as r, cnnexp.tuning.study as s; r.GRACE_PERIOD_S = s.GRACE_PERIOD_S = 600\n"
COUNT = """SELECT datname, count(*) FROM pg_stat_activity
           WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY datname"""


def cnnexp(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *map(str, args)]


# What one worker process takes (proportional set size, torch and mlflow imported, training): 500 MB measured.
WORKER_MB = 550


def available_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) // 1024 for line in meminfo if line.startswith("MemAvailable:"))


def measure(env: dict, admin: str, work: Path, pool: str, n: int) -> dict:
    """N one-trial workers on a new study; the peak connections while they run."""
    if available_mb() < n * WORKER_MB + 2048:  # on a shared machine, running out would kill others' processes
        return {"pool": pool, "workers": n, "skipped": f"{available_mb()} MB available, {n} workers need ~{n * WORKER_MB}"}
    hook = work / f"hook-{pool}"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(LONG_GRACE + POOLS[pool])
    env = {**env, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    name = f"connections-{pool}-{n}-{int(time.time())}"
    common = ["--storage", env["OPTUNA_STORAGE"], "--study-name", name, "--data-dir", work / "data"]
    subprocess.run(cnnexp("tune", *common, "--workers", 0, "--n-trials", n, "--epochs", 1, "--pruner", "none",
                          "--source", SAMPLE), env=env, check=True, capture_output=True, cwd=work)
    started = time.monotonic()
    logs = [open(work / f"{name}-{i}.log", "w+") for i in range(n)]
    workers = [subprocess.Popen(cnnexp("worker", *common, "--n-trials", 1), env=env, cwd=work, stdout=log,
                                stderr=subprocess.STDOUT) for log in logs]
    peak = {"optuna": 0, "mlflow": 0, "total": 0, "alive_at_peak": 0, "stopped_early": False}
    try:
        with psycopg.connect(admin, autocommit=True) as db:
            max_connections = int(db.execute("SHOW max_connections").fetchone()[0])
            while any(w.poll() is None for w in workers):
                counts = dict(db.execute(COUNT).fetchall())
                total = sum(counts.values())
                peak["optuna"] = max(peak["optuna"], counts.get("optuna", 0))
                peak["mlflow"] = max(peak["mlflow"], counts.get("mlflow", 0))
                if total > peak["total"]:
                    peak.update(total=total, alive_at_peak=sum(w.poll() is None for w in workers))
                time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (e.g. memory running out): the peaks so far still count
        peak["stopped_early"] = True
    finally:  # no worker outlives the cluster it talks to
        for w in workers:
            if w.poll() is None:
                w.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    trials = optuna.load_study(study_name=name, storage=env["OPTUNA_STORAGE"]).get_trials()
    return {"pool": pool, "workers": n, **peak, "max_connections": max_connections,
            "failed_workers": sum(w.returncode != 0 for w in workers),
            "too_many_clients": sum("too many clients" in o for o in outputs),
            "first_error": next((o.strip().splitlines()[-1] for w, o in zip(workers, outputs) if w.returncode), ""),
            "trials_finished": sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials),
            "seconds": round(time.monotonic() - started, 1), "load_avg_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="8,16,32", help="comma-separated worker counts")
    parser.add_argument("--pools", default="nullpool", help=f"comma-separated, of: {', '.join(POOLS)}")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so `finally` stops the workers and the cluster
    # Not under mktemp -d's 0700 directory: as root the cluster belongs to `postgres`, which must enter it.
    work = Path(tempfile.mkdtemp(prefix="cnnexp-connections-"))
    work.chmod(0o755)
    env = {**os.environ, "PGPORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = [str(REPO / "scripts" / "local-cluster.sh")]
    rows = []
    try:
        up = subprocess.run(script + ["up", str(work / "cluster")], env=env, capture_output=True, text=True)
        if up.returncode:
            sys.exit(up.stdout + up.stderr)
        env.update(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                   if line.startswith("export "))
        admin = f"postgresql://postgres@127.0.0.1:{env['PGPORT']}/postgres"
        for pool in args.pools.split(","):
            for n in map(int, args.workers.split(",")):
                rows.append(measure(env, admin, work, pool, n))
                print(json.dumps(rows[-1]), flush=True)
                if rows[-1].get("stopped_early"):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("stopped early", file=sys.stderr)
    finally:
        subprocess.run(script + ["down", str(work / "cluster")], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
