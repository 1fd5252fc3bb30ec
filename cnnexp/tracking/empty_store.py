"""A new local (sqlite) tracking store as a copy of an empty one that this MLflow version made before.

MLflow makes a new sqlite store by running every one of its schema migrations (about 1.7 s on an idle 2-core
machine: a third of a short study's start, paid in every new directory). Each MLflow version makes the same
empty store, so the first one made is kept in the user's cache and later new stores are copies of it, with
what MLflow writes per store put right: the default experiment's artifact location and times.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

from cnnexp.locks import file_lock

# Where MLflow puts a local store's artifacts unless told otherwise: ./mlruns of the working directory.
DEFAULT_ARTIFACT_ROOT = "./mlruns"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnexp"


def template_path() -> Path:
    return cache_dir() / f"empty-mlflow-{mlflow.__version__}.db"


def make_template(template: Path) -> None:
    """An empty store as MLflow makes it, written whole or not at all (another process may be reading it)."""
    template.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(template.with_name(f"{template.name}.lock")):
        if template.exists():
            return
        with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
            made = Path(scratch) / "mlflow.db"
            MlflowClient(f"sqlite:///{made}").search_experiments(max_results=1)
            os.replace(made, template)


def copy_empty_store(path: Path) -> bool:
    """Writes an empty store at `path` (which must not exist yet); False where the cache cannot be used
    (a read-only home, say), and MLflow then makes the store itself."""
    template = template_path()
    partial = path.with_name(f".{path.name}.partial")
    try:
        if not template.exists():
            make_template(template)
        shutil.copyfile(template, partial)
        artifacts = append_to_uri_path(resolve_uri_if_local(DEFAULT_ARTIFACT_ROOT), "0")
        now = int(time.time() * 1000)
        with sqlite3.connect(partial) as db:
            db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                       "WHERE experiment_id = 0", (artifacts, now, now))
        db.close()
        os.replace(partial, path)
        return True
    except (OSError, sqlite3.Error):
        partial.unlink(missing_ok=True)
        return False
