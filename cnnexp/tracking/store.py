"""The tracking store: which one, bounded waits on a server, the up-front check, and quiet output."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit

import mlflow
from mlflow.tracking import MlflowClient

from cnnexp.checks import ConfigError, first_line
from cnnexp.verbosity import verbose
from cnnexp.locks import sqlite_creation_lock, sqlite_file
from cnnexp.tracking import empty_store

# MLflow's own defaults (a 120 s timeout, 7 retries with exponential backoff) make each call to a server
# that is gone wait about four minutes. Ours: a call gives up after at most ~35 s (3 tries of 10 s, 1 s
# and 2 s apart), while a server that blinks (a restart) is still retried. A user's own values win.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
STORE_CHECK_TIMEOUT_S = 3
# A server that took the connection but has not answered within STORE_CHECK_TIMEOUT_S may only be busy (16 workers
# starting at once on 2 cores made one wait past 3 s): it is asked once more, this long, before it is refused.
BUSY_SERVER_WAIT_S = 5


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# A database store's default ports (SQLAlchemy's dialects, "dialect+driver://user@host:port/db").
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}


def database_address(uri: str) -> tuple[str, int] | None:
    """(host, port) of a database tracking store reached over TCP, else None (sqlite, files, a server, a socket)."""
    parts = urlsplit(uri)
    dialect = parts.scheme.split("+")[0]
    if dialect not in DATABASE_PORTS or not parts.hostname:  # no host: a local Unix socket, which cannot hang
        return None
    try:
        return parts.hostname, parts.port or DATABASE_PORTS[dialect]
    except ValueError:  # a port that is no number: SQLAlchemy's own error says so
        return None


def is_file_store(uri: str) -> bool:
    """A plain path or file: URI, which MLflow 3.x refuses as a tracking store (its "maintenance mode")."""
    return urlsplit(uri).scheme in ("", "file")


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
    path = sqlite_file(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite_creation_lock(uri):
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
    """Why the tracking server does not answer a quick request (STORE_CHECK_TIMEOUT_S; one that took the connection
    and stayed silent is asked once more, for BUSY_SERVER_WAIT_S), or None.

    Servers (http, https) are asked; a database's port (postgresql, mysql, ...) is only connected to, since
    MLflow retries building its engine for about two minutes before it says the database is down. A local
    store (sqlite, files) cannot hang on the network.
    """
    uri = uri or tracking_uri()
    address = database_address(uri)
    if address is not None:
        return _port_problem(address)
    if not is_server(uri):
        return None
    for timeout in (STORE_CHECK_TIMEOUT_S, BUSY_SERVER_WAIT_S):
        try:
            with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            return None
        except Exception as err:  # noqa: BLE001 - connection refused, timeout, HTTP errors: all mean no store
            problem = _network_reason(err)
            if problem != "Read timed out":  # refused, unreachable, an HTTP error: asking again would say the same
                return problem
    return problem


def _port_problem(address: tuple[str, int]) -> str | None:
    """Why nothing takes a TCP connection at host:port within STORE_CHECK_TIMEOUT_S, or None."""
    try:
        socket.create_connection(address, timeout=STORE_CHECK_TIMEOUT_S).close()
    except OSError as err:  # refused, timed out, an unknown host
        return err.strerror or str(err) or type(err).__name__
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


FILE_STORE_ADVICE = ("MLflow 3.x refuses file stores (./mlruns here holds this project's artifacts, not a store); "
                     "unset MLFLOW_TRACKING_URI for the default sqlite:///mlflow.db, or point it at a database or "
                     "an http:// server")


def check_store() -> None:
    """Refuses to start when the tracking store cannot be used, within seconds, naming the setting: a server or
    database that does not answer, or a file store MLflow would refuse with a paragraph of its own."""
    if is_file_store(tracking_uri()) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise ConfigError("MLFLOW_TRACKING_URI", f"{tracking_uri()} is a file store: {FILE_STORE_ADVICE}")
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
