"""The one place that leans on MLflow behaviour outside its public API (written against MLflow 3.17.2).

tests/unit/tracking/test_mlflow_private.py fails loudly when that behaviour changes, so the workaround
can go (or be redone) in the same change that moves MLflow.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import mlflow.pyfunc
import mlflow.utils.environment

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from cnnexp.processes import alive
from cnnexp.tracking import tags

GUARD_GRACE_S = 10.0  # after `mlflow run` itself exits: it has re-marked the run by then, or never will
GUARD_LIMIT_S = 600.0  # an upper bound on the helper's life, whatever happens to its parent


def keep_killed_after_mlflow_run(run_id: str) -> None:
    """Keeps an interrupted `mlflow run` run KILLED.

    After our script exits, `mlflow run` re-marks the run FAILED: mlflow.projects._maybe_set_run_terminated
    (MLflow 3.17.2) passes the status string to RunStatus.is_terminated, which compares it with RunStatus
    ints, so it never sees that the run already ended. A detached helper waits for that write and puts
    KILLED back; it ends once `mlflow run` has exited (plus a grace period).
    """
    code = ("import sys; from cnnexp.tracking.mlflow_private import restore_killed; "
            "restore_killed(sys.argv[1], int(sys.argv[2]))")
    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-c", code, run_id, str(os.getppid())], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )


def restore_killed(run_id: str, mlflow_run_pid: int) -> None:
    client = MlflowClient()
    started, parent_gone = time.monotonic(), None
    while time.monotonic() - started < GUARD_LIMIT_S:
        run = client.get_run(run_id)
        if run.info.status == "FAILED" and tags.ERROR not in run.data.tags:
            client.set_terminated(run_id, "KILLED")
            return
        if parent_gone is None and not alive(mlflow_run_pid):
            parent_gone = time.monotonic()
        if parent_gone is not None and time.monotonic() - parent_gone > GUARD_GRACE_S:
            return
        time.sleep(0.2)


def link_version_to_logged_model(client: MlflowClient, version: ModelVersion) -> None:
    """What mlflow.register_model does after creating a version and client.create_model_version does not
    (mlflow.tracking._model_registry.fluent._register_model, MLflow 3.17.2): it appends {"name", "version"}
    to the logged model's `mlflow.modelVersions` tag, a JSON list. The UI's model page reads that tag, so
    without it the model says "Not registered" and offers to register it again.

    Not mlflow.register_model itself: it also prints two lines on stderr that our one line already says.
    """
    model_id = version_model_id(version)
    if not model_id:
        return
    linked = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    entries = (json.loads(linked) if linked else []) + [{"name": version.name, "version": version.version}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})


def version_model_id(version: ModelVersion) -> str | None:
    """The id of the logged model a registered version was made from.

    MLflow 3.17.2's SQL registry (sqlite, and PostgreSQL behind `mlflow server`) keeps no model_id column:
    a version reads back with model_id None even after mlflow.register_model. Its source,
    models:/<model_id>, is the link the registry keeps.
    """
    if version.model_id:
        return version.model_id
    model_id = (version.source or "").removeprefix("models:/")
    return model_id if model_id != version.source and model_id.startswith("m-") and "/" not in model_id else None


_stated = threading.local()


def _unless_stated(check):
    @functools.wraps(check)
    def check_unless_stated(requirements):
        if not getattr(_stated, "active", False):
            check(requirements)

    check_unless_stated.cnnexp = True
    return check_unless_stated


# Where MLflow calls its requirement check by this name: saving a model, and pyfunc's load, which
# Model.log runs to validate the input example.
CHECKING_MODULES = (mlflow.utils.environment, mlflow.pyfunc)


@contextlib.contextmanager
def requirements_as_stated() -> Iterator[None]:
    """Logs a model (in this thread) without MLflow checking its pip requirements against this environment.

    MLflow 3.17-3.18 warns where a model's requirement is not what is installed, as it saves the model and as
    Model.log loads it back to validate the input example; to know which module is which package it first
    maps every installed distribution (importlib.metadata.packages_distributions): half a second of CPU once
    per process, well over a second of a short train's end on a loaded machine. cnnexp states the installed
    versions themselves (models.model_requirements), so there is nothing for that check to find. Other
    threads, and models that are not cnnexp's, are checked as before.
    """
    for module in CHECKING_MODULES:
        if not getattr(module.warn_dependency_requirement_mismatches, "cnnexp", False):
            module.warn_dependency_requirement_mismatches = _unless_stated(module.warn_dependency_requirement_mismatches)
    _stated.active = True
    try:
        yield
    finally:
        _stated.active = False
