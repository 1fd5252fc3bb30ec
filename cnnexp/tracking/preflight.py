"""cnnexp's MLflow plugin: `mlflow run` of this project stops within seconds, in one line, when the tracking
server does not answer, instead of waiting out MLflow's own retries (about four minutes refused, without end
silent) and then printing a long traceback.

MLflow loads the entry-point group `mlflow.request_header_provider` when a process makes its first HTTP request
to a tracking server (mlflow.utils.rest_utils.http_request, MLflow 3.17.2) and asks each provider `in_context()`
before the request is sent. This provider adds no header; its first call is the check, and it acts only in the
`mlflow run` command line itself (its click context is active), running a local project whose MLproject is
named cnnexp, against an http(s) tracking URI. There, before MLflow looks up the experiment or creates the run:
- it asks the server as store.store_problem does (a silent one twice); without an answer it prints one line naming
  MLFLOW_TRACKING_URI and exits 2 (SystemExit passes MLflow's `except Exception` around providers);
- otherwise it sets store.HTTP_BOUNDS as defaults for that command and the entry point it starts (a user's own
  values win), the bounds every cnnexp process uses anyway, and (unless CNNEXP_VERBOSE) hides the command's
  "View run ... at" lines, as cnnexp's own processes do.
Everywhere else (other projects, scripts, notebooks, `mlflow server`, local stores) it does nothing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

from cnnexp.tracking import store
from cnnexp.verbosity import verbose

PROJECT_NAME = "cnnexp"
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
_checked = False  # at most once per process, at its first request


def mlflow_run_project_dir() -> Path | None:
    """The local project directory when this process is the `mlflow run` command line, else None."""
    click = sys.modules.get("click")  # MLflow's CLI runs on click; a process without it is not `mlflow run`
    ctx = click.get_current_context(silent=True) if click is not None else None
    if ctx is None or ctx.command.name != "run" or getattr(ctx.command.callback, "__module__", None) != "mlflow.cli":
        return None
    path, _, subdir = str(ctx.params.get("uri") or "").partition("#")  # MLflow's "<uri>#<subdirectory>"
    directory = Path(path).expanduser() / subdir
    return directory if directory.is_dir() else None  # a Git URI is not checked


def is_this_project(directory: Path) -> bool:
    import yaml  # an MLflow dependency

    mlproject = directory / "MLproject"
    try:
        spec = yaml.safe_load(mlproject.read_text())
    except Exception:  # noqa: BLE001 - no MLproject, or a broken one: MLflow itself reports that
        return False
    return isinstance(spec, dict) and spec.get("name") == PROJECT_NAME


def check_before_mlflow_run() -> None:
    """In `mlflow run` of cnnexp against a server: exits with one line if the server does not answer."""
    directory = mlflow_run_project_dir()
    uri = store.tracking_uri()
    if directory is None or not store.is_server(uri) or not is_this_project(directory):
        return
    try:
        problem = store.store_problem(uri)
    except KeyboardInterrupt:  # Ctrl-C during the (at most a few seconds) wait: nothing was created yet
        print("mlflow run: interrupted before any run started", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if problem is not None:
        print(f"mlflow run: error: MLFLOW_TRACKING_URI: {store.unreachable_message(uri, problem)}", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_BAD_INPUT)
    store.bound_http_waits()
    if not verbose():  # the command's own "🏃 View run ... at" lines: train already prints its run's page
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class PreflightCheck(RequestHeaderProvider):
    """Adds no header; its first in_context() call is the check (see the module's docstring)."""

    def in_context(self) -> bool:
        global _checked
        if not _checked:
            _checked = True  # before the probe: its own request comes back through here
            check_before_mlflow_run()
        return False

    def request_headers(self) -> dict:
        return {}
