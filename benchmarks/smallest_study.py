"""Benchmark `smallest`: the fixed cost of a study, 1 trial x 1 epoch on the real sample, as whole processes:
`mlflow run . -e tune`, `cnnexp tune` and the hand-written Optuna + MLflow script (handwritten_tune.py),
interleaved, each in a fresh directory with a new sqlite store (the data prepared once, beforehand).
    python benchmarks/smallest_study.py --repeats 3 [--repo DIR]    # DIR: another checkout, side by side
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import DEFAULT_SOURCE, write_torchvision_root  # noqa: E402
from cnnexp.data import read_source  # noqa: E402

FLAGS = {"n_trials": 1, "epochs": 1, "dataset": "fashion-mnist-sample", "seed": 0}


def timed(command: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def contenders(repo: Path, shared: Path, root: Path) -> dict:
    def fresh(name: str) -> tuple[Path, dict]:
        work = Path(tempfile.mkdtemp(prefix=f"smallest-{name}-", dir=shared))
        return work, {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}

    def mlflow_run() -> float:
        work, env = fresh("mlflow-run")
        params = {**FLAGS, "data_dir": shared / "data", "storage": work / "journal.log"}
        command = ["mlflow", "run", str(repo), "-e", "tune", "--env-manager", "local",
                   *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
        return timed(command, work, env)

    def cnnexp_tune() -> float:
        work, env = fresh("cnnexp")
        params = {**FLAGS, "data_dir": shared / "data", "storage": work / "journal.log"}
        command = [sys.executable, "-m", "pipelines.cli", "tune",
                   *[a for k, v in params.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
        return timed(command, repo, env)

    def handwritten() -> float:
        work, env = fresh("handwritten")
        return timed([sys.executable, str(REPO / "benchmarks" / "handwritten_tune.py"), str(root), "1", "1", "0"], work, env)

    return {"hand-written": handwritten, "cnnexp tune": cnnexp_tune, "mlflow run -e tune": mlflow_run}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose cnnexp is timed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnnexp-smallest-") as tmp:
        shared = Path(tmp)
        splits, _ = read_source("fashion-mnist", DEFAULT_SOURCE)
        root = write_torchvision_root(shared / "tv", splits["train"], splits["test"])
        subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", "--dataset", FLAGS["dataset"], "--data-dir",
                        str(shared / "data")], cwd=args.repo, check=True, capture_output=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{shared}/prepare.db"})
        runs = contenders(args.repo, shared, root)
        seconds = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                seconds[name].append(run())
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    base = medians["hand-written"]
    for name, values in seconds.items():
        print(f"{name:<20} median {medians[name]:5.1f} s  ({', '.join(f'{v:.1f}' for v in values)})  "
              f"{medians[name] / base:.2f}x the hand-written script")
    return {"seconds": seconds, "medians": medians, "ratios": {n: m / base for n, m in medians.items()}}


if __name__ == "__main__":
    print(json.dumps(main()["ratios"]))
