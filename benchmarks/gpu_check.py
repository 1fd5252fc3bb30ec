"""Every GPU figure of the training engine in one unattended run, printed as one table and written as JSON.

    benchmarks/gpu_check.sh            # on a bare GPU machine: installs carried wheels, then runs this
    JSON: $OUT/gpu_check.json (every figure), logs: $OUT/logs.tar.gz

In order, each under its own time limit so the figures come first and the suite takes what is left:
1. the CUDA-only tests;
2. benchmarks/engine.py: a `fit` epoch at batch 100 and 1000 on 60,000 images, cohorts of 16 and 64 vs
   as many separate fits at batch 100 and at tune's batch mix, graphs, streams, cudnn.benchmark, bf16;
3. `cnnexp tune --n-trials 100 --epochs 5` at full size (60,000 images tiled from the bundled sample) with
   defaults and a fresh store, from command to exit, with the GPU's utilization sampled every 200 ms;
   the same study with per-trial tracking stubbed out (benchmarks/tune_stubbed.py), with cohort=64 and with
   cohort=1 (each under a time limit: a study cut short says so); before them, where the same command's time
   before its first step goes (benchmarks/startup.py);
4. the test suite, serially, in the time left: the fast selection first, then the slow and server tests.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", 480))  # the whole run, under the device's 8 minutes
STUDY = ["--n-trials", "100", "--epochs", "5"]
CUDA_TESTS = ["tests/unit/test_engine.py", "tests/unit/test_train.py", "tests/unit/tracking/test_resume.py"]


class Utilization:
    """nvidia-smi's GPU utilization every 200 ms, stamped with this clock."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "200"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.monotonic(), float(line)))

    def between(self, start: float, stop: float) -> dict:
        window = [(t, u) for t, u in self.samples if start <= t <= stop]
        busy = [t - start for t, u in window if u > 0]
        return {"mean_pct": statistics.fmean(u for _, u in window) if window else None, "samples": len(window),
                "first_busy_s": busy[0] if busy else None}


def run(cmd: list[str], timeout: float, log: Path, cwd: Path = REPO, env: dict | None = None) -> dict:
    """A command's wall time, exit code and output (into log), stopped at timeout."""
    started = time.monotonic()
    with log.open("w") as out:
        try:
            code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"rc": code, "wall_s": time.monotonic() - started, "started": started}


def full_size_data(work: Path) -> Path:
    """The bundled sample tiled to 60,000 train / 10,000 test images, prepared as `cnnexp prepare` does."""
    from harness import DEFAULT_SOURCE, load_data, write_torchvision_root

    train, _, test, kind = load_data(DEFAULT_SOURCE, 60000, 10000)
    raw = write_torchvision_root(work / "idx", train, test) / "FashionMNIST" / "raw"
    data = work / "data"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", "--source", str(raw), "--data-dir", str(data)],
                   cwd=work, env=study_env(work), check=True, capture_output=True)
    print(f"data: {kind}", flush=True)
    return data


def study_env(work: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def study(name: str, data: Path, extra: list[str], timeout: float, out: Path, gpu: Utilization, script: list[str]) -> dict:
    """One study in a fresh directory (fresh MLflow store and journal), timed from command to exit."""
    work = Path(tempfile.mkdtemp(prefix=f"study-{name}-"))
    cmd = [sys.executable, *script, *STUDY, "--data-dir", str(data), *extra]
    result = run(cmd, timeout, out / f"study_{name}.log", cwd=work, env=study_env(work))
    result.update(gpu.between(result.pop("started"), time.monotonic()))
    result.update(study_outcome(work / "optuna-journal.log"))
    shutil.rmtree(work, ignore_errors=True)
    return result


def startup(data: Path, extra: list[str], timeout: float, out: Path) -> dict:
    """The study's command up to its first step, each phase stamped from the process's start."""
    with tempfile.TemporaryDirectory(prefix="startup-") as work:
        stamps = Path(work) / "startup.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "startup.py"), *STUDY, "--data-dir", str(data), *extra,
               "--out", str(stamps)]
        result = run(cmd, timeout, out / "startup.log", cwd=Path(work), env=study_env(Path(work)))
        result.pop("started")
        result["stamps"] = json.loads(stamps.read_text()) if stamps.exists() else {}
    return result


def study_outcome(journal: Path) -> dict:
    import optuna
    from optuna.trial import TrialState

    from cnnexp.tuning.study import open_storage

    if not journal.exists():
        return {}
    found = optuna.load_study(study_name="cnnexp-tune", storage=open_storage(str(journal)))
    states = [t.state for t in found.trials]
    complete = [t for t in found.trials if t.state == TrialState.COMPLETE]
    return {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL), "trial_epochs": sum(len(t.intermediate_values) for t in found.trials),
            "best_val_accuracy": max((t.value for t in complete), default=None)}


def main() -> int:
    import torch

    results = Path(os.environ.get("OUT") or REPO / "benchmarks" / "gpu_check_out")
    out = results / "logs"  # the device tool brings back 8 files: the logs travel as one archive
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    left = lambda: deadline - time.monotonic()  # noqa: E731
    cuda = torch.cuda.is_available()
    print(f"{torch.cuda.get_device_name(0) if cuda else 'no CUDA device: a CPU smoke run'}, torch {torch.__version__}",
          flush=True)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    report["cuda_tests"] = run([*pytest, *CUDA_TESTS, "-k", "cuda or captured"], min(120, left()), out / "cuda_tests.log")
    engine = [sys.executable, "benchmarks/engine.py", "--out", str(out / "engine.json"), "--sizes", "16,64"]
    report["engine"] = run(engine if cuda else [*engine, "--quick", "--device", "cpu"], min(150, left()), out / "engine.log")
    gpu = Utilization() if cuda else None
    with tempfile.TemporaryDirectory() as work:
        data = full_size_data(Path(work))
        report["startup"] = startup(data, [] if cuda else ["--device", "cpu"], min(90, left() - 60), out)
        print(f"startup: {report['startup']}", flush=True)
        tune, stubbed = ["-m", "pipelines.cli", "tune"], ["benchmarks/tune_stubbed.py"]
        studies = {"default": (tune, [], 90), "tracking_stubbed": ([str(REPO / stubbed[0])], [], 60),
                   "cohort_64": (tune, ["--cohort", "64"], 60), "cohort_1": (tune, ["--cohort", "1"], 100)}
        for name, (script, extra, limit) in studies.items():
            if not cuda:
                extra = [*extra, "--device", "cpu", "--n-trials", "2", "--epochs", "1"]
            report[f"study_{name}"] = study(name, data, extra, min(limit, left() - 60), out, gpu or _NoGpu(), script)
            print(f"study {name}: {report[f'study_{name}']}", flush=True)
    if gpu is not None:
        gpu.proc.terminate()
    suite = [*pytest, "--timeout", "120"] if _has_pytest_timeout() else pytest
    # On the CPU the suite is CI's to run; here only the GPU machine's serial run is the point.
    for part, marks in (("suite_fast", "not slow and not server"), ("suite_slow", "slow or server")):
        report[part] = run([*suite, "-m", marks], left() - 10, out / f"{part}.log") if cuda else \
            {"rc": "skipped (no CUDA)", "wall_s": 0}
    report["engine_rows"] = json.loads((out / "engine.json").read_text())["rows"] if (out / "engine.json").exists() else []
    (results / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report, out)
    shutil.make_archive(str(results / "logs"), "gztar", out)
    shutil.rmtree(out)
    return 0


class _NoGpu:
    def between(self, start: float, stop: float) -> dict:
        return {}


def _has_pytest_timeout() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytest_timeout") is not None


def _tail(log: Path, lines: int = 1) -> str:
    text = log.read_text().strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:])


def print_table(report: dict, out: Path) -> None:
    rows = [("CUDA-only tests", f"rc {report['cuda_tests']['rc']}: {_tail(out / 'cuda_tests.log')}")]
    for row in report["engine_rows"]:
        speed = f"  x{row['speedup_second']:.2f} (epoch 1 x{row['speedup_first']:.2f})" if "speedup_second" in row else ""
        rows.append((row["contender"], f"epoch 1 {row['first_s']:.3f} s, epoch 2 {row['second_s']:.3f} s{speed}"))
    stamps = report.get("startup", {}).get("stamps", {})
    rows.append(("tune's first step, from its start", ", ".join(f"{what} {at:.1f} s" for what, at in stamps.items()
                                                               if not what.endswith(": start")) or "not reached"))
    for name in ("default", "tracking_stubbed", "cohort_64", "cohort_1"):
        s = report.get(f"study_{name}", {})
        rows.append((f"tune 100x5 {name}", f"rc {s.get('rc')}, {s.get('wall_s', 0):.1f} s, best {s.get('best_val_accuracy')}, "
                                          f"{s.get('complete')} complete / {s.get('pruned')} pruned / {s.get('failed')} failed, "
                                          f"{s.get('trial_epochs')} trial-epochs, GPU busy {s.get('mean_pct')}% "
                                          f"(first busy at {s.get('first_busy_s')} s)"))
    default, stubbed = report.get("study_default", {}), report.get("study_tracking_stubbed", {})
    if default.get("wall_s") and stubbed.get("wall_s"):
        rows.append(("tracking's share of the study", f"{1 - stubbed['wall_s'] / default['wall_s']:.1%}"))
    for part in ("suite_fast", "suite_slow"):
        rows.append((f"tests, {part}, serially", f"rc {report[part]['rc']} in {report[part]['wall_s']:.0f} s: "
                                                 f"{_tail(out / f'{part}.log')}"))
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)


if __name__ == "__main__":
    sys.exit(main())
