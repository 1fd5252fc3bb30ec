"""A tracking server that is not there, or goes away mid-run: refused within seconds, or one line saying
what was not logged and how to get it in; never minutes of silence per call."""
import http.server
import os
import socket
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnexp.tracking import models, store
from helpers import use_tracking_uri
from pipelines import train


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers (a hung server, or a firewall's black hole)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_an_unreachable_server_is_refused_within_seconds_naming_the_variable(server, silent_server, monkeypatch,
                                                                            tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    use_tracking_uri(monkeypatch, "http://127.0.0.1:9" if server == "refused" else silent_server)
    started = time.monotonic()
    assert train.cli(["--epochs", "1"]) == 2
    assert time.monotonic() - started < 10
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train: error: MLFLOW_TRACKING_URI: the tracking server http://127.0.0.1:")
    assert ("Connection refused" if server == "refused" else "timed out") in line
    assert not any(tmp_path.iterdir())


def test_a_busy_server_that_answers_after_the_first_wait_is_not_refused():
    """A server slower than STORE_CHECK_TIMEOUT_S (16 workers starting at once on 2 cores) is asked once more."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # MLflow's search_experiments
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(store.STORE_CHECK_TIMEOUT_S + 1)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        assert store.store_problem(f"http://127.0.0.1:{server.server_port}") is None
        server.shutdown()


def test_ctrl_c_while_checking_the_store_claims_no_run(workdir, monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "store_problem", interrupted)
    assert train.cli(["--epochs", "1"]) == 130
    assert capsys.readouterr().err.strip() == "train: interrupted before any run started"


def test_http_waits_are_bounded_for_this_process_but_a_users_own_setting_wins(monkeypatch):
    for name in store.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    store.bound_http_waits()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == store.HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_a_server_lost_after_training_keeps_the_checkpoint_says_what_is_missing_and_resume_logs_it(
        workdir, idx_source, monkeypatch, capsys):
    real_log = models.log_kept_model

    def server_gone(*args):
        raise MlflowException("API request to http://db-host:5000/api failed with exception [Errno 111] Connection refused")

    monkeypatch.setattr(models, "log_kept_model", server_gone)
    answers = iter([None])  # the check up front still finds the server; afterwards it is gone
    monkeypatch.setattr(store, "store_problem", lambda: next(answers, "[Errno 111] Connection refused"))
    assert train.cli(["--epochs", "2", "--batch-size", "50", "--source", str(idx_source)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert sum(line.startswith("train: ") for line in err) == 1, err
    (run,) = MlflowClient().search_runs(["0"])
    run_id = run.info.run_id
    assert "stopped answering ([Errno 111] Connection refused); not logged: the model" in line
    assert "keeps all 2 epochs" in line and f"`cnnexp train --resume {run_id}`" in line
    assert (workdir / "checkpoints" / run_id / train.STORE_LOST).is_file()

    # The server could not be told the run stopped: it is still RUNNING there, and resumable all the same.
    MlflowClient().update_run(run_id, status="RUNNING")
    monkeypatch.setattr(models, "log_kept_model", real_log)
    monkeypatch.setattr(store, "store_problem", lambda: None)
    assert train.cli(["--resume", run_id]) == 0
    done = MlflowClient().get_run(run_id)
    assert done.info.status == "FINISHED" and done.outputs.model_outputs
    assert not (workdir / "checkpoints" / run_id).exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("dialect", ["postgresql", "mysql+pymysql"])
def test_a_database_that_is_down_is_refused_within_seconds_naming_the_variable(dialect, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    use_tracking_uri(monkeypatch, f"{dialect}://u:secret@127.0.0.1:{_closed_port()}/mlflow")
    started = time.monotonic()
    assert train.cli(["--epochs", "1"]) == 2
    assert time.monotonic() - started < 10  # MLflow alone retries its engine for about two minutes
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"train: error: MLFLOW_TRACKING_URI: the tracking server {dialect}://u:***@127.0.0.1:")
    assert "Connection refused" in line and not any(tmp_path.iterdir())


def test_only_a_database_reached_over_tcp_is_probed():
    assert store.database_address("postgresql://u@db.example:6000/x") == ("db.example", 6000)
    assert store.database_address("mysql+pymysql://u@db.example/x") == ("db.example", 3306)
    for local in ("postgresql:///x?host=/var/run/postgresql", "sqlite:///mlflow.db", "http://h:5000", "file:./mlruns"):
        assert store.database_address(local) is None


@pytest.mark.parametrize("uri", ["file:./mlruns", "./mlruns"])
def test_a_file_store_is_one_line_saying_mlflow_refuses_it_and_what_to_use(uri, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    use_tracking_uri(monkeypatch, uri)
    assert train.cli(["--epochs", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train: error: MLFLOW_TRACKING_URI: ") and "is a file store: MLflow 3.x refuses" in line
    assert "sqlite:///mlflow.db" in line
