"""The tracking store: which one, bounded waits on a server, the up-front check, and quiet output."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import mlflow
from mlflow.tracking import MlflowClient

from cnnexp.checks import ConfigError, first_line
from cnnexp.verbosity import verbose
from cnnexp.locks import file_lock
from cnnexp.tracking import empty_store

# MLflow's own defaults (a 120 s timeout, 7 retries with exponential backoff) make each call to a server
# that is gone wait about four minutes. Ours: a call gives up after at most ~35 s (3 tries of 10 s, 1 s
# and 2 s apart), while a server that blinks (a restart) is still retried. A user's own values win.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
STORE_CHECK_TIMEOUT_S = 3


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def writes_queued() -> bool:
    """Whether per-epoch writes go through MLflow's background queue: to a server, so the network's latency
    stays off the training loop. A local store takes them at once (milliseconds); MLflow's queue would make
    every flush and every run's end wait up to a second for its idle worker (2.3 s of a 3.5 s 3-epoch run)."""
    return is_server(tracking_uri())


def use_tracking_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    os.environ.pop("MLFLOW_RUN_ID", None)  # a worker must never resume the parent run as its own


def open_store() -> None:
    """Opens the store, creating a new sqlite one under a file lock (from this MLflow's empty store, where
    one is cached: cnnexp.tracking.empty_store).

    Several processes creating one store at once race through MLflow's table migrations and fail
    ("table _alembic_tmp_... already exists"); once it exists, concurrent runs are fine.
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f"{path.name}.lock")):
        if not path.exists():
            empty_store.copy_empty_store(path)
        MlflowClient().search_experiments(max_results=1)


def bound_http_waits() -> None:
    """Applies HTTP_BOUNDS to this process and the workers it spawns (MLflow reads them at every call)."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def store_problem(uri: str | None = None) -> str | None:
    """Why the tracking server does not answer one quick request (one try, STORE_CHECK_TIMEOUT_S), or None.

    Only servers (http, https) are probed: a local store (sqlite, files) cannot hang on the network.
    """
    uri = uri or tracking_uri()
    if not is_server(uri):
        return None
    try:
        with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(STORE_CHECK_TIMEOUT_S), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - connection refused, timeout, HTTP errors: all mean no store
        return _network_reason(err)
    return None


def _network_reason(err: BaseException) -> str:
    """The part of MLflow's long request error a user acts on ("Connection refused", "timed out")."""
    text = first_line(err)
    for pattern in (r"\[Errno -?\d+\] [^'\")]+", r"(Read|Connect) timed out", r"timed out", r"\d{3} [A-Z][\w ]+"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    return text[:200]


def unreachable_message(uri: str, problem: str) -> str:
    return (f"the tracking server {redact_url(uri)} does not answer ({problem}); start it or point "
            "MLFLOW_TRACKING_URI at one that runs")


def check_store() -> None:
    """Refuses to start when the tracking server does not answer, within seconds, naming the setting."""
    problem = store_problem()
    if problem is not None:
        raise ConfigError("MLFLOW_TRACKING_URI", unreachable_message(tracking_uri(), problem))


def quiet_mlflow() -> None:
    """MLflow's INFO lines (store migrations) and its dataset-source warning stay out of a normal run's output.

    The warning: a local file path as a dataset source matches two registered source kinds, and MLflow
    says it picked one, at every log_input.
    """
    if verbose():
        return
    # Set in the environment, so that spawned workers and the processes `mlflow run` starts inherit them: no
    # "🏃 View run ... at" lines per run on a server, no per-file download bars (loading, registering).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Its ERROR per failed background batch repeats what our one line says at the end of a run whose
    # server went away (what was not logged, and how to resume).
    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)
    # Its ERROR and traceback per failed SQL write (a full disk, a read-only file: dozens of lines per run)
    # repeat what our one line says (cnnexp.tracking.store_errors).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # The pickle WARNING at every model save: the pyfunc face never unpickles (see models.py).
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")


def redact_url(url: str) -> str:
    """The URL with any password (user:password@ or ?password=) replaced by ***, safe to log or print."""
    parts = urlsplit(url)
    if parts.password is not None:
        user, host = parts.netloc.rsplit("@", 1)
        url = url.replace(parts.netloc, f"{user.split(':', 1)[0]}:***@{host}", 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = ("password", "passwd", "pwd", "secret", "token")
    if any(k.lower() in secret for k, _ in pairs):
        query = urlencode([(k, "***" if k.lower() in secret else v) for k, v in pairs], safe="*")
        url = url.replace(parts.query, query, 1)
    return url
