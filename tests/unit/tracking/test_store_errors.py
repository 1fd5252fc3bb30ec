"""A tracking store that cannot be written (cnnexp.tracking.store_errors): one line naming MLFLOW_TRACKING_URI
(exit 1 for a full disk, 2 for a read-only store), and a run its process could not end left where
`cnnexp orphans` finds it. The store's own failures are simulated with the exceptions MLflow raises for them
(measured on a real full tmpfs and a read-only file: the same text)."""
import errno

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.tracking import log, owners, store, store_errors, tags
from pipelines import orphans, train

ARGS = ["--epochs", "3", "--batch-size", "50"]
SQLITE_FULL = "(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO metrics ...]"
SQLITE_READ_ONLY = "(sqlite3.OperationalError) attempt to write a readonly database\n[SQL: INSERT INTO runs ...]"


def _store_error(text: str):
    def fail(*args, **kwargs):
        raise MlflowException(text)
    return fail


def _full_from_epoch_2(real_log_epoch):
    def log_epoch(metrics):
        if metrics["epoch"] == 2:
            _store_error(SQLITE_FULL)()
        real_log_epoch(metrics)
    return log_epoch


def test_a_full_store_is_one_line_and_the_run_ends_failed(workdir, idx_source, monkeypatch, capsys):
    monkeypatch.setattr(log, "log_epoch", _full_from_epoch_2(log.log_epoch))
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"train: error: MLFLOW_TRACKING_URI: the tracking store sqlite:///{workdir / 'mlflow.db'} cannot "
                    "be written: its disk is full; free space there, then run again")
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED"


def test_a_run_the_full_store_could_not_end_is_named_and_orphans_ends_it(workdir, idx_source, monkeypatch, capsys):
    monkeypatch.setattr(log, "log_epoch", _full_from_epoch_2(log.log_epoch))
    with monkeypatch.context() as full:  # nothing more can be written: not the error tag, not the end
        full.setattr(MlflowClient, "set_terminated", _store_error(SQLITE_FULL))
        full.setattr(MlflowClient, "set_tag", _store_error(SQLITE_FULL))
        assert train.cli(ARGS + ["--source", str(idx_source)]) == 1
    (run,) = MlflowClient().search_runs(["0"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"its disk is full; free space there, then run again; left RUNNING: run {run.info.run_id} "
                         "(once there is space, `cnnexp orphans --end true` ends it)")
    assert run.info.status == "RUNNING"
    # Written with the run itself, before anything filled up: what orphans looks for once this process is gone.
    assert run.data.tags[tags.ENTRY_POINT] == "train" and tags.OWNER_PID in run.data.tags
    monkeypatch.setattr(owners, "is_dead", lambda me: True)
    assert orphans.cli(["--end", "true"]) == 0
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_a_read_only_store_is_one_line_naming_the_variable_exit_2(workdir, idx_source, monkeypatch, capsys):
    monkeypatch.setattr(MlflowClient, "create_run", _store_error(SQLITE_READ_ONLY))
    assert train.cli(ARGS + ["--source", str(idx_source)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"train: error: MLFLOW_TRACKING_URI: the tracking store sqlite:///{workdir / 'mlflow.db'} is "
                    "read-only; point MLFLOW_TRACKING_URI at a store you can write")


@pytest.mark.parametrize("code, exit_code, says", [
    (errno.EROFS, 2, "is read-only (Read-only file system: "),
    (errno.EACCES, 2, "is read-only (Permission denied: "),
    (errno.ENOSPC, 1, "cannot be written: its disk is full (No space left on device: "),
])
def test_a_store_whose_lock_file_cannot_be_made_is_one_line(workdir, monkeypatch, capsys, code, exit_code, says):
    lock = str(workdir / "mlflow.db.lock")

    def cannot(*args, **kwargs):
        raise OSError(code, {errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
                             errno.ENOSPC: "No space left on device"}[code], lock)

    monkeypatch.setattr(store, "open_store", cannot)
    assert train.cli(ARGS) == exit_code
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train: error: MLFLOW_TRACKING_URI: the tracking store sqlite:///") and says + lock in line


def test_only_the_stores_own_errors_are_read_as_the_store_failing():
    assert store_errors.unwritable_store(OSError(errno.ENOSPC, "No space left on device")) is None  # a file of ours
    assert store_errors.unwritable_store(MlflowException("RESOURCE_DOES_NOT_EXIST: no run")) is None
    assert isinstance(store_errors.unwritable_store(MlflowException(SQLITE_FULL)), RuntimeError)


def test_mlflows_own_sql_error_logging_is_quiet_unless_verbose(monkeypatch):
    import logging

    monkeypatch.delenv("CNNEXP_VERBOSE", raising=False)
    logger = logging.getLogger("mlflow.store.db.utils")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    store.quiet_mlflow()
    assert not logger.isEnabledFor(logging.ERROR)  # its traceback per failed write: 40-90 lines a run
