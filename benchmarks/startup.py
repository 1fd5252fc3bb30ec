"""Where `cnnexp tune` spends the time before its first training step: the GPU sat idle for the first 21 s
of the H200 study (docs/performance.md), and this says which phase took them. It runs the real command,
stamps each phase from the process's start, and exits once the first step is done (on CUDA: replayed and
synchronised, so a first capture is included).

    python benchmarks/startup.py --n-trials 100 --epochs 5 --data-dir data     # tune's own flags
    python benchmarks/startup.py --out startup.json ...                         # the stamps as JSON too

A fresh tracking store and journal in a temporary directory, as the study on the GPU had, unless
MLFLOW_TRACKING_URI or --storage name others: the run it stops at its first step leaves its parent run and
first trials RUNNING where they are (its artifacts go where MLflow puts them by default: ./mlruns).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

STARTED = psutil.Process().create_time()  # the interpreter's own start, before any import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STAMPS: list[tuple[str, float]] = []


def stamp(what: str) -> None:
    STAMPS.append((what, time.time() - STARTED))


def timed(owner: object, name: str, label: str) -> None:
    """owner.name stamped at its first call's start and end."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        first = not any(what.startswith(label) for what, _ in STAMPS)
        if first:
            stamp(f"{label}: start")
        try:
            return original(*args, **kwargs)
        finally:
            if first:
                stamp(f"{label}: end")

    setattr(owner, name, wrapper)


def report_and_exit(out: str | None) -> None:
    width = max(len(what) for what, _ in STAMPS)
    previous = 0.0
    for what, at in STAMPS:
        print(f"{what:<{width}}  {at:7.2f} s  (+{at - previous:.2f})", file=sys.stderr)
        previous = at
    if out:
        Path(out).write_text(json.dumps(dict(STAMPS), indent=1))
    sys.stderr.flush()
    os._exit(0)  # the first step is what was asked for; the study is not run


def first_step_ends_the_run(table_class, out: str | None) -> None:
    import torch

    original = table_class.train_epoch

    def train_epoch(self, plan, data, forward, bf16, on_step):
        stamp("first epoch: start")

        def after(step, losses):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stamp("first step: done")
            report_and_exit(out)

        return original(self, plan, data, forward, bf16, after)

    table_class.train_epoch = train_epoch


def main(argv: list[str]) -> int:
    out = None
    if "--out" in argv:
        at = argv.index("--out")
        out, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    scratch = tempfile.mkdtemp(prefix="startup-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{scratch}/mlflow.db")
    if "--storage" not in argv:
        argv = [*argv, "--storage", f"{scratch}/optuna-journal.log"]
    stamp("interpreter up")
    importlib.import_module("torch")
    stamp("torch imported")
    from cnnexp import slots
    from cnnexp.tracking import store
    from cnnexp.tuning import report, study
    from pipelines import cli, tune

    stamp("pipelines.tune imported")
    timed(store, "check_store", "tracking store checked")
    timed(study, "load_study", "study opened")
    timed(tune, "load_or_prepare", "data loaded")
    timed(report, "log_study_settings", "parent run open, settings logged")
    timed(slots.Resident, "of", "data on the device")
    timed(slots.Table, "_graph", "first step captured")
    first_step_ends_the_run(slots.Table, out)
    return cli.main(["tune", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
