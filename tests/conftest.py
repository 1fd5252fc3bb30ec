"""Fixtures: synthetic IDX sources, and working directories whose MLflow store is a copy of one migrated
per session (creating a sqlite store's tables takes seconds; copying the file, milliseconds)."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import work_in_copied_store, write_idx_dir

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items):
    """Everything under tests/e2e/ runs real processes (mlflow run, servers, PostgreSQL): slow by folder."""
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_study_figures(request, monkeypatch):
    """A study's seven figures cost about 2 s at its end (matplotlib), and most tests run several studies
    without looking at them: only tests marked study_figures draw them (test_report.py checks each figure,
    helpers.assert_study_table_and_figures that tune logs them all; subprocesses always draw them)."""
    if "study_figures" not in request.keywords:
        from cnnexp.tuning import report

        monkeypatch.setattr(report, "figures", lambda study: {})


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """The cache a new store is copied from (cnnexp.tracking.empty_store) is the session's, not the user's;
    subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def idx_source(tmp_path) -> Path:
    return write_idx_dir(tmp_path / "idx")


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with every table made, once per session."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path.parent)
        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, migrated_store) -> Path:
    """A fresh working directory with its own MLflow store, as a user's checkout would have."""
    work = tmp_path / "work"
    work.mkdir()
    work_in_copied_store(monkeypatch, work, migrated_store)
    return work
