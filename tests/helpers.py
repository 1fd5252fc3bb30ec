"""What several test modules share: tiny synthetic IDX data, stores, subprocess environments, broken files.

Test modules import from here, never from each other; fixtures live in conftest.py.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import io
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnexp.data import Split
from cnnexp.tuning.space import params_of
from cnnexp.tuning.study import open_storage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # the throwaway servers' helpers (scripts/mlflow_server.py)
from mlflow_server import free_port  # noqa: E402,F401 - the cluster fixtures and tests take it from here
CPU = torch.device("cpu")
INITDB = glob.glob("/usr/lib/postgresql/*/bin/initdb")  # the PostgreSQL server, where installed


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else 0x0800 + array.ndim
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class is a bright bar at its own position plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, label in enumerate(labels):
        row = 2 + 2 * label
        images[i, row : row + 3, 4:24] = 230
    return images.astype(np.uint8), labels.astype(np.uint8)


def tensor_split(n: int, seed: int) -> Split:
    images, labels = synthetic_split(n, seed)
    return Split(torch.from_numpy(images), torch.from_numpy(labels).long())


def offline_downloads(monkeypatch) -> list:
    """FashionMNIST's download fails as without network; returns the list of attempts (their roots)."""
    import torchvision.datasets as tvd

    attempts = []

    def no_network(self, *args, **kwargs):
        attempts.append(self.root)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd.FashionMNIST, "download", no_network)
    return attempts


def downloads_fail_halfway(monkeypatch) -> None:
    """MNIST's download writes part of a file, then fails as a dropped connection would."""
    import torchvision.datasets as tvd

    def half_a_download(self, *args, **kwargs):
        os.makedirs(self.raw_folder, exist_ok=True)
        Path(self.raw_folder, "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        raise RuntimeError("Error downloading train-labels-idx1-ubyte.gz")

    monkeypatch.setattr(tvd.MNIST, "download", half_a_download)


def write_idx_dir(directory: Path, n_train: int = 400, n_test: int = 100, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_split(n, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)
    return directory


def _break(directory: Path, name: str, data: bytes) -> None:
    for old in directory.glob(f"{name}*"):
        old.unlink()
    (directory / name).write_bytes(data)


# Ways a source directory of IDX files can be broken, and the file each one's error must name.
BAD_FILES = {
    "missing": lambda d: (d / "train-labels-idx1-ubyte.gz").unlink(),
    "truncated": lambda d: _break(d, "train-images-idx3-ubyte", idx_bytes(np.zeros((400, 28, 28)))[:-100]),
    "corrupt gzip": lambda d: _break(d, "t10k-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00garbage"),
    "wrong magic": lambda d: _break(d, "train-labels-idx1-ubyte", idx_bytes(np.zeros(400), magic=2051)),
    "wrong shape": lambda d: _break(d, "train-images-idx3-ubyte", idx_bytes(np.zeros((400, 32, 32)))),
    "label out of range": lambda d: _break(d, "t10k-labels-idx1-ubyte", idx_bytes(np.full(100, 12))),
    "count mismatch": lambda d: _break(d, "train-labels-idx1-ubyte", idx_bytes(np.zeros(399))),
}
EXPECTED_FILE = {
    "missing": "train-labels-idx1-ubyte",
    "truncated": "train-images-idx3-ubyte",
    "corrupt gzip": "t10k-images-idx3-ubyte.gz",
    "wrong magic": "train-labels-idx1-ubyte",
    "wrong shape": "train-images-idx3-ubyte",
    "label out of range": "t10k-labels-idx1-ubyte",
    "count mismatch": "train-labels-idx1-ubyte",
}


def use_store(monkeypatch, work: Path) -> None:
    """Points MLflow at work/mlflow.db."""
    use_tracking_uri(monkeypatch, f"sqlite:///{work / 'mlflow.db'}")


def copy_store(template: Path, work: Path) -> Path:
    """The migrated store copied into work/, its default experiment's artifacts under work/mlruns (as a
    store made there would have them), so no two tests share an artifact directory."""
    target = work / "mlflow.db"
    shutil.copy(template, target)
    with sqlite3.connect(target) as db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(work / "mlruns" / "0"),))
    return target


@contextlib.contextmanager
def own_store(tmp_path_factory, name: str, migrated_store: Path) -> Iterator[Path]:
    """For a module-scoped fixture (monkeypatch is function-scoped): a new directory, the working directory and
    the home of a copy of the migrated store while the block runs."""
    work = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        work_in_copied_store(mp, work, migrated_store)
        yield work


def work_in_copied_store(monkeypatch, work: Path, migrated_store: Path) -> None:
    """work/ becomes the working directory and the home of a copy of the migrated store."""
    monkeypatch.chdir(work)
    copy_store(migrated_store, work)
    use_store(monkeypatch, work)


def use_tracking_uri(monkeypatch, uri: str) -> None:
    """The env var alone is not enough: once any test has called mlflow.set_tracking_uri, that
    process-wide setting wins over MLFLOW_TRACKING_URI (even where a call passes tracking_uri=, as
    download_artifacts does when it looks up a run's logged model)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)


def subprocess_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    return env


def mlflow_run_command(entry: str, **params) -> list[str]:
    """`mlflow run` of this checkout's entry point as a user types it (local env, params as strings)."""
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return args


EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def metric_histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """A run's per-epoch metrics as (step, value) lists: two runs that trained alike have equal ones."""
    client = MlflowClient()
    return {m: [(x.step, x.value) for x in client.get_metric_history(run_id, m)] for m in EPOCH_METRICS}


def model_uri(run_id: str, client: MlflowClient | None = None) -> str:
    """models:/<id> of the model a run logged last (a run that logged several: runs:/<run_id>/model is ambiguous)."""
    return f"models:/{(client or MlflowClient()).get_run(run_id).outputs.model_outputs[-1].model_id}"


def run_mlflow(entry: str, work: Path, **params) -> subprocess.CompletedProcess:
    """`mlflow run` of an entry point in work/, on work/'s store, as a user would type it."""
    return subprocess.run(mlflow_run_command(entry, **params), cwd=work, env=subprocess_env(work), capture_output=True,
                          text=True, timeout=600)


def interrupted_after_epoch_1(real_engine):
    """The engine, with Ctrl-C arriving right after every member's first epoch was reported."""

    class Interrupted(real_engine):
        def epochs(self, on_step=None):
            yield self.epoch(on_step)
            raise KeyboardInterrupt

    return Interrupted


def worst_last_epoch(real_fit):
    """fit, with the last epoch reported at val_accuracy 0: the best epoch is then an earlier one, whose
    weights differ from the final ones (real accuracies on the synthetic bars only rise)."""

    def fit(state, train, val, *, epochs, on_epoch_end, **options):
        def report(metrics, state):
            on_epoch_end({**metrics, "val_accuracy": 0.0} if metrics["epoch"] == epochs else metrics, state)

        return real_fit(state, train, val, epochs=epochs, on_epoch_end=report, **options)

    return fit


# --- a study's two records: Optuna's trials and MLflow's runs ---------------------------------------

MLFLOW_STATE = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
FIGURES = {"optimization_history.png", "param_importances.png", "contour_lr_batch_size.png", "intermediate_values.png",
           "parallel_coordinate.png", "timeline.png"}


def study_of(work, name="cnnexp-tune"):
    return optuna.load_study(study_name=name, storage=open_storage(str(work / "optuna-journal.log")))


def client_of(work):
    # Not mlflow.set_tracking_uri: that would outlive the test and send later in-process runs here.
    return MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def parent_and_children(work):
    runs = client_of(work).search_runs(["0"], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return parents, children


def assert_optuna_and_mlflow_agree(study, child_runs, client, killed=None):
    """Every trial has exactly one child run with its params, state and per-epoch values, and no run is extra.

    killed: the number of a trial whose worker was SIGKILLed; an epoch is written to two stores one
    after the other, so a kill between the writes may leave its last epoch in only one of them.
    """
    by_number = {}
    for run in child_runs:
        number = int(run.data.tags["optuna.trial_number"])
        assert number not in by_number, f"trial {number} logged twice"
        by_number[number] = run
    trials = {t.number: t for t in study.trials}
    assert set(by_number) == set(trials)
    for number, trial in trials.items():
        run = by_number[number]
        assert run.info.status == MLFLOW_STATE[trial.state.name], number
        assert run.data.tags.get("mlflow.runName", run.info.run_name).startswith(f"trial-{number}-")
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert int(run.data.params["batch_size"]) == params_of(trial)["batch_size"]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        logged = {m.step: pytest.approx(m.value) for m in history}
        assert len(history) == len(logged), f"trial {number}: an epoch logged twice"
        if number == killed:
            last = max([*logged, *trial.intermediate_values], default=0)
            logged.pop(last, None)
            reported = {step: value for step, value in trial.intermediate_values.items() if step != last}
            assert logged == reported
        else:
            assert logged == trial.intermediate_values
        if trial.state.name == "COMPLETE":
            # The trial's value is its best epoch's, whose weights are its model (MLflow 3: a LoggedModel of the run).
            assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)
            assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
            (model,) = run.outputs.model_outputs
            assert model.step == run.data.metrics["best_epoch"], number
        else:
            assert not run.outputs.model_outputs, number
        if trial.state.name == "PRUNED":
            assert run.data.tags["pruned_at_epoch"] == str(max(trial.intermediate_values))


def assert_study_table_and_figures(study, parent, child_runs):
    """The parent's trials.csv names each trial's run and model; the best trial's model is a tag."""
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "parallel_coordinate.png", "timeline.png"} <= artifacts
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/trials.csv")))
    assert list(table["number"]) == [t.number for t in study.trials]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in child_runs}
    for row in table.itertuples():
        run = by_number[row.number]
        assert row.mlflow_run_id == run.info.run_id and row.state == study.trials[row.number].state.name
        models = [m.model_id for m in run.outputs.model_outputs]
        assert (row.mlflow_model_id if isinstance(row.mlflow_model_id, str) else None) == (models[0] if models else None)
    best = table.loc[table["number"] == study.best_trial.number, "mlflow_model_id"].iloc[0]
    assert parent.data.tags["best_model_id"] == best


def points_of(study: optuna.Study) -> list[tuple[float, int]]:
    return [(round(t.params["lr"], 12), params_of(t)["batch_size"]) for t in study.trials]


# --- a study on PostgreSQL and an `mlflow server` (the `cluster` fixture, tests/e2e/conftest.py) ------

def cnnexp(*args) -> list[str]:
    """The `cnnexp` command line, run by this interpreter from this checkout."""
    return [sys.executable, "-m", "pipelines.cli", *map(str, args)]


def cluster_env(cluster: dict, work: Path, hook: Path | None = None) -> dict:
    env = subprocess_env(work)
    env["MLFLOW_TRACKING_URI"] = cluster["MLFLOW_TRACKING_URI"]
    env["PYTHONPATH"] = os.pathsep.join([*([str(hook)] if hook else []), str(REPO)])
    return env


def create_study(cluster, work, name, n_trials, epochs, monkeypatch) -> tuple[list[str], optuna.Study]:
    """`tune --workers 0` (in this process: only the workers need processes of their own): the study, its
    settings and its parent run; returns the flags workers share."""
    from pipelines import tune

    monkeypatch.chdir(work)  # `runs:/` model URIs resolve through the default tracking URI too
    use_tracking_uri(monkeypatch, cluster["MLFLOW_TRACKING_URI"])
    source = write_idx_dir(work / "idx", n_train=200, n_test=50)
    common = ["--storage", cluster["OPTUNA_STORAGE"], "--study-name", name]
    assert tune.cli([*common, "--workers", "0", "--n-trials", str(n_trials), "--epochs", str(epochs), "--batch-min", "16",
                     "--batch-max", "64", "--source", str(source), "--data-dir", str(work / "data")]) == 0
    return [*common, "--source", str(source)], optuna.load_study(study_name=name, storage=cluster["OPTUNA_STORAGE"])


def children(client: MlflowClient, study: optuna.Study):
    """The study's parent run and its child runs (one a trial), from the tracking server."""
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
    return parent, runs
