"""cnnexp.tracking.preflight, the MLflow plugin: inside `mlflow run` of this project against a server that does not
answer, one line and exit 2 before MLflow's first request; against one that answers, our HTTP bounds; anywhere
else, nothing. (tests/e2e/test_dead_server.py runs the real `mlflow run`.)"""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click
import mlflow.cli
import pytest

from cnnexp.tracking import preflight, store
from helpers import REPO, use_tracking_uri

REFUSED = "http://127.0.0.1:9"


@pytest.fixture
def answering_server():
    """Answers every request as an MLflow server with no experiments would."""
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            body = json.dumps({"experiments": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _run_context(project_dir):
    """The click context `mlflow run <project_dir>` has while MLflow makes its first request."""
    ctx = click.Context(mlflow.cli.run, info_name="run")
    ctx.params["uri"] = str(project_dir)
    return ctx.scope(cleanup=False)


def test_a_server_that_does_not_answer_stops_mlflow_run_of_this_project_in_one_line(monkeypatch, capsys):
    use_tracking_uri(monkeypatch, REFUSED)
    with _run_context(REPO), pytest.raises(SystemExit) as stopped:
        preflight.check_before_mlflow_run()
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mlflow run: error: MLFLOW_TRACKING_URI: the tracking server {REFUSED} does not answer (")
    assert "Connection refused" in line


def test_a_server_that_answers_gets_our_http_bounds_and_a_users_own_setting_wins(monkeypatch, answering_server):
    use_tracking_uri(monkeypatch, answering_server)
    for name in store.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    with _run_context(REPO):
        preflight.check_before_mlflow_run()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == store.HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


@pytest.mark.parametrize("where", ["no mlflow run", "another project", "a local store"])
def test_anywhere_else_it_does_nothing(where, monkeypatch, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "MLproject").write_text("name: someone-elses\n")
    use_tracking_uri(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}" if where == "a local store" else REFUSED)
    if where == "no mlflow run":
        preflight.check_before_mlflow_run()  # a script or notebook: no click context
    else:
        with _run_context(other if where == "another project" else REPO):
            preflight.check_before_mlflow_run()
    assert capsys.readouterr().err == ""


def test_the_provider_adds_no_header_and_checks_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(preflight, "_checked", False)
    monkeypatch.setattr(preflight, "check_before_mlflow_run", lambda: calls.append(1))
    provider = preflight.PreflightCheck()
    assert provider.in_context() is False and provider.in_context() is False
    assert calls == [1] and provider.request_headers() == {}
