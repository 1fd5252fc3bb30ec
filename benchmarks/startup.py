"""Where `cnnexp tune` spends the time before its first training step: the GPU sat idle for the first 21 s
of the H200 study (docs/performance.md), and this says which phase took them. It runs the real command,
stamps each phase from the process's start, and exits once the first step is done (on CUDA: replayed and
synchronised, so a first capture is included). With `train` first, it stamps a whole `cnnexp train` instead,
to the end of its work (the process's own exit is benchmarks/fixed_cost.py's).

    python benchmarks/startup.py --n-trials 100 --epochs 5 --data-dir data     # tune's own flags
    python benchmarks/startup.py train --epochs 1 --dataset fashion-mnist-sample  # train's own flags
    python benchmarks/startup.py --out startup.json ...                         # the stamps as JSON too

It runs in a temporary directory of its own (paths given are taken from where it is called; the data from
./data unless --data-dir says), with a fresh tracking store and journal as the study on the GPU had, and
removes it on exit. Only a store named by MLFLOW_TRACKING_URI or --storage keeps what the stopped study
left: its parent run and first trials RUNNING.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PATH_FLAGS = ("--data-dir", "--source", "--storage", "--checkpoint-dir")


def process_start() -> float:
    """When this process started, on time.time()'s clock: the interpreter's own start, before any import.
    Linux's /proc/self/stat counts it in clock ticks since boot; elsewhere, this script's start."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


STARTED = process_start()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STAMPS: list[tuple[str, float]] = []
SCRATCH = Path(tempfile.mkdtemp(prefix="startup-"))


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
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os._exit(0)  # the first step is what was asked for; the study is not run


def stamp_first_step(table_class, then=None) -> None:
    """Stamps the first epoch's start and its first step's end (then calls `then`)."""
    import torch

    original = table_class.train_epoch

    def train_epoch(self, on_step):
        first = not any(what == "first step: done" for what, _ in STAMPS)
        if first:
            stamp("first epoch: start")

        def after(step, losses):
            if first and not any(what == "first step: done" for what, _ in STAMPS):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                stamp("first step: done")
                if then is not None:
                    then()
            if on_step is not None:
                on_step(step, losses)

        return original(self, after)

    table_class.train_epoch = train_epoch


def in_scratch(argv: list[str]) -> list[str]:
    """tune's flags with their paths made absolute, and this process moved into SCRATCH with a store there."""
    if not any(arg.split("=")[0] == "--data-dir" for arg in argv):
        argv = [*argv, "--data-dir", "data"]  # tune's default, taken from where it is called
    for i, arg in enumerate(argv):
        flag, is_joined, value = arg.partition("=")
        if is_joined and flag in PATH_FLAGS and value:
            argv[i] = f"{flag}={Path(value).resolve()}"
        elif i and argv[i - 1] in PATH_FLAGS and arg:
            argv[i] = str(Path(arg).resolve())
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{SCRATCH / 'mlflow.db'}")
    # os._exit leaves the resource tracker a semaphore to warn about; nothing is lost by it.
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.chdir(SCRATCH)  # the journal, ./mlruns and any checkpoints: removed with it
    return argv


def stamp_tune(out: str | None) -> None:
    from cnnexp import slots
    from cnnexp.tracking import store
    from cnnexp.tuning import report, study
    from pipelines import tune

    stamp("pipelines.tune imported")
    timed(store, "check_store", "tracking store checked")
    timed(study, "load_study", "study opened")
    timed(tune, "load_or_prepare", "data loaded")
    timed(report, "log_study_settings", "parent run open, settings logged")
    timed(slots.Resident, "of", "data on the device")
    timed(slots.CapturedTable, "_graph", "first step captured")
    for table_class in (slots.CapturedTable, slots.EagerTable):
        stamp_first_step(table_class, then=lambda: report_and_exit(out))


def stamp_train() -> None:
    from cnnexp import slots
    from cnnexp.tracking import log, store
    from pipelines import train

    stamp("pipelines.train imported")
    timed(store, "check_store", "tracking store checked")
    timed(train, "load_or_prepare", "data loaded")
    timed(store, "open_store", "store opened")
    timed(log, "log_config", "run started, params logged")
    timed(slots.Resident, "of", "data on the device")
    for table_class in (slots.CapturedTable, slots.EagerTable):
        stamp_first_step(table_class)
    timed(log, "log_epoch", "epoch 1 logged")
    timed(train, "log_results", "model logged")


def main(argv: list[str]) -> int:
    out = None
    if "--out" in argv:
        at = argv.index("--out")
        out, argv = str(Path(argv[at + 1]).resolve()), argv[:at] + argv[at + 2:]
    command = argv.pop(0) if argv and argv[0] in ("train", "tune") else "tune"
    argv = in_scratch(argv)
    stamp("interpreter up")
    importlib.import_module("torch")
    stamp("torch imported")
    from pipelines import cli

    if command == "tune":
        stamp_tune(out)
        return cli.main(["tune", *argv])
    stamp_train()
    code = cli.main(["train", *argv])
    stamp("train done")
    report_and_exit(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
