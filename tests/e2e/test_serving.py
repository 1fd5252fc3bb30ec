"""The logged model served by `mlflow models serve`: it answers as evaluate predicted, refuses bad pixels,
and loads with MLflow's pickle loading switched off."""
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cnnexp.data import load_prepared
from helpers import free_port, own_store, subprocess_env, write_idx_dir
from pipelines import evaluate, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, migrated_store):
    """One training run, evaluated on the test split."""
    with own_store(tmp_path_factory, "serve", migrated_store) as work:
        source = write_idx_dir(work / "idx")
        assert train.cli(["--lr", "0.01", "--epochs", "2", "--batch-size", "50", "--source", str(source)]) == 0
        (run,) = MlflowClient().search_runs(["0"])
        assert evaluate.cli(["--model-uri", f"runs:/{run.info.run_id}/model"]) == 0
        (scored,) = MlflowClient().search_runs(["0"], filter_string=f"tags.scored_run_id = '{run.info.run_id}'")
        yield SimpleNamespace(work=work, run_id=run.info.run_id, evaluation_id=scored.info.run_id)


def _post(port: int, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["predictions"]


def test_served_model_answers_as_evaluate_predicted(trained):
    run_id = trained.run_id
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        # Serving loads the weights alone: it must work with MLflow's pickle loading switched off.
        cwd=trained.work, env={**subprocess_env(trained.work), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        while True:
            assert server.poll() is None, "the server exited"
            assert time.monotonic() - started < 120, "no /ping answer within 120 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        print(f"mlflow models serve answered /ping after {time.monotonic() - started:.1f} s")
        data = load_prepared(trained.work / "data", "fashion-mnist")
        images, classes = data.splits["test"].images.numpy(), data.classes
        expected = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
            f"runs:/{trained.evaluation_id}/predictions.csv")))["predicted"].tolist()
        for inputs in (images.tolist(), (images / 255.0).tolist()):
            assert [a["class_index"] for a in _post(port, {"inputs": inputs})] == expected
            named = _post(port, {"inputs": inputs, "params": {"output": "named"}})
            assert [(a["class_index"], a["class_name"]) for a in named] == [(i, classes[i]) for i in expected]
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(port, {"inputs": (images[:1].astype(int) + 300).tolist()})
        assert refused.value.code == 400
        assert "integer pixels must be within 0-255" in json.load(refused.value)["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
