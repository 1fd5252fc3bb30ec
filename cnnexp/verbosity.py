"""Whether a command shows MLflow's and Optuna's own log lines, warnings and tracebacks (a normal run shows
only ours): --verbose sets the variable, so that the processes a command spawns (tuning workers) are as loud
as it is; under `mlflow run`, which has no such flag, the user sets it."""
from __future__ import annotations

import os

VERBOSE_ENV = "CNNEXP_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")
