"""Fixtures: synthetic IDX sources, and working directories whose MLflow store is a copy of one migrated
per session (creating a sqlite store's tables takes seconds; copying the file, milliseconds)."""
from __future__ import annotations

import os
from pathlib import Path

# Two test processes side by side on a 2-core machine (pytest-xdist; pytest_xdist_auto_num_workers below): a
# torch thread each, in them and in the processes they start, rather than four threads spinning for two cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from mlflow.tracking import MlflowClient

from helpers import work_in_copied_store, write_idx_dir

E2E = Path(__file__).resolve().parent / "e2e"


# The test files that use the session's PostgreSQL + MLflow server (tests/e2e/conftest.py's cluster): one
# pytest-xdist worker runs them all, so the cluster starts once. pytest_collection_modifyitems holds this to the
# fixture's users.
CLUSTER_FILES = {"tests/e2e/test_scale.py", "tests/e2e/test_slurm.py"}


def pytest_collection_modifyitems(items):
    """Everything under tests/e2e/ runs real processes (mlflow run, servers, PostgreSQL): slow by folder."""
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
        if "cluster" in getattr(item, "fixturenames", ()) and _test_file(item.nodeid) not in CLUSTER_FILES:
            raise pytest.UsageError(f"{item.nodeid} uses the cluster fixture: add its file to CLUSTER_FILES")


def _test_file(nodeid: str) -> str:
    return nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): two test processes for the suite, a folder or a selection of it; named test
    files run in this one, where a second process would only double their few seconds (and `--pdb` always
    does, xdist's rule). PYTEST_XDIST_AUTO_NUM_WORKERS, where set, decides instead, as xdist documents."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return 0 if all(Path(arg.split("::")[0]).is_file() for arg in config.args) else 2


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist hands a worker one test file at a time, so that its module fixtures (a server, trained
    models) are made once, and the cluster's files as one. Files go out in
    collection order, tests/e2e/ (the longest) first, not xdist's default of the most tests first: that left
    the cluster's minutes for the end, with the other worker idle."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class FileByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = _test_file(nodeid)
            return "cluster" if path in CLUSTER_FILES else path

    return FileByFile(config, log)


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
