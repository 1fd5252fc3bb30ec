"""A new sqlite store is a copy of the empty store this MLflow made once, not another run of its migrations."""
import sqlite3

import mlflow
from mlflow.tracking import MlflowClient

from cnnexp.tracking import empty_store, store
from helpers import use_tracking_uri


def _open_new_store(monkeypatch, work) -> None:
    work.mkdir()
    monkeypatch.chdir(work)
    use_tracking_uri(monkeypatch, f"sqlite:///{work / 'mlflow.db'}")
    store.open_store()


def _rows(path, query):
    with sqlite3.connect(path) as db:
        return db.execute(query).fetchall()


def test_a_new_store_is_the_cached_empty_store_with_its_own_artifact_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _open_new_store(monkeypatch, tmp_path / "first")
    template = empty_store.template_path()
    assert template.is_file() and mlflow.__version__ in template.name
    _open_new_store(monkeypatch, tmp_path / "second")
    copy = tmp_path / "second" / "mlflow.db"
    schema = "SELECT version_num FROM alembic_version"
    assert _rows(copy, schema) == _rows(template, schema) == _rows(tmp_path / "first" / "mlflow.db", schema)
    # The default experiment's artifacts go where a store MLflow made here would put them.
    assert _rows(copy, "SELECT artifact_location FROM experiments") == [(str(tmp_path / "second" / "mlruns" / "0"),)]
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.0)
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {"m": 1.0}
    assert run.info.artifact_uri.startswith(str(tmp_path / "second" / "mlruns" / "0"))


def test_where_the_cache_cannot_be_written_mlflow_makes_the_store_itself(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _open_new_store(monkeypatch, tmp_path / "work")
    assert _rows(tmp_path / "work" / "mlflow.db", "SELECT name FROM experiments") == [("Default",)]
    assert not list((tmp_path / "work").glob(".*partial"))
