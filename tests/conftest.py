from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def idx_source(tmp_path) -> Path:
    return write_idx_dir(tmp_path / "idx")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working directory with its own MLflow store, as a user's checkout would have."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    use_store(monkeypatch, work)
    return work


def use_store(monkeypatch, work: Path) -> None:
    """Points MLflow at work/mlflow.db."""
    use_tracking_uri(monkeypatch, f"sqlite:///{work / 'mlflow.db'}")


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


def worst_last_epoch(real_fit):
    """fit, with the last epoch reported at val_accuracy 0: the best epoch is then an earlier one, whose
    weights differ from the final ones (real accuracies on the synthetic bars only rise)."""

    def fit(state, train, val, *, epochs, on_epoch_end, **options):
        def report(metrics):
            on_epoch_end({**metrics, "val_accuracy": 0.0} if metrics["epoch"] == epochs else metrics)

        return real_fit(state, train, val, epochs=epochs, on_epoch_end=report, **options)

    return fit
