"""Against a real `mlflow server` over HTTP: two trainings (one registered) and a study with two workers land
with their per-epoch histories and models, and print only cnnexp's own lines.

Marked `server` (a server, three `mlflow run`s; a minute or two on 2 cores). Where Chromium is installed
it also loads the UI's runs table headless and looks for the run names.
"""
import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from helpers import REPO, subprocess_env, write_idx_dir

sys.path.insert(0, str(REPO / "scripts"))
from mlflow_server import chromium, find_chromium, mlflow_server  # noqa: E402

pytestmark = pytest.mark.server

RUNS = [
    {"lr": 0.01, "batch_size": 50, "epochs": 2, "register": "served-cnn"},
    {"lr": 0.02, "batch_size": 100, "epochs": 2, "system_metrics": "true"},
]
STUDY = {"n_trials": 4, "cohort": 2, "workers": 2, "epochs": 1, "storage": "journal.log"}
# What a normal run prints: cnnexp's lines, and `mlflow run`'s own "=== ... ===" lines about the command.
OURS = [r"epoch +\d+/\d+  loss ", r"run [0-9a-f]{32} at http://127\.0\.0\.1:\d+/#/experiments/",
        r"model: runs:/[0-9a-f]{32}/model \(models:/m-[0-9a-f]+\)  epoch ", r"fashion-mnist is not prepared in .*; preparing it first",
        r"registered served-cnn version \d+", r"study 'cnnexp-tune', call 1: 0 earlier trials; running 4 more in cohorts ",
        r"trial +\d+  lr=", r"done: \d+ complete", r"tune: \d+ s, \d+( of \d+)? trials done, ",
        r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.projects[.\w]*: === .* ===\s*$"]


def api(url: str, path: str, body: dict | None = None, **query) -> dict:
    address = f"{url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def start(entry: str, url: str, work, source, params: dict, data: str) -> subprocess.Popen:
    env = subprocess_env(work) | {"MLFLOW_TRACKING_URI": url, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}
    env.pop("CNNEXP_VERBOSE", None)
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    params = params | {"source": source, "data_dir": work / data}  # no shared prepare
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A server with two finished trainings and a study; yields (url, training runs by lr, every line printed)."""
    root = tmp_path_factory.mktemp("server")
    source = write_idx_dir(root / "idx")
    with mlflow_server(root / "mlflow") as url:
        processes = [start("train", url, root, source, params, f"data-{params['lr']}") for params in RUNS]
        processes.append(start("tune", url, root, source, {**STUDY, "storage": root / "journal.log"}, "data-tune"))
        lines = []
        for process in processes:  # side by side: a third of the wait
            output, _ = process.communicate(timeout=600)
            assert process.returncode == 0, output[-3000:]
            lines += output.splitlines()
        runs = api(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": ["0"]})["runs"]
        yield url, {float(_params(r)["lr"]): r for r in runs if "lr" in _params(r) and "optuna.trial_number" not in
                    {t["key"] for t in r["data"].get("tags", [])} and "n_trials" not in _params(r)}, lines


def test_a_normal_run_prints_only_its_own_lines(trained):
    _, _, lines = trained
    strangers = [line for line in lines if not any(re.match(pattern, line) for pattern in OURS)]
    assert not strangers, "\n".join(strangers)
    assert sum(line.startswith("trial ") for line in lines) == STUDY["n_trials"]


def _params(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def test_both_runs_finished_with_their_parameters(trained):
    _, runs, _ = trained
    assert sorted(runs) == [0.01, 0.02]
    for spec in RUNS:
        run = runs[spec["lr"]]
        assert run["info"]["status"] == "FINISHED"
        assert _params(run)["batch_size"] == str(spec["batch_size"])


@pytest.mark.parametrize("metric", ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s"])
def test_each_run_has_a_per_epoch_history(trained, metric):
    url, runs, _ = trained
    for run in runs.values():
        history = api(url, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key=metric)
        assert [m["step"] for m in history["metrics"]] == [1, 2]


def test_each_run_has_its_model(trained):
    url, runs, _ = trained
    models = api(url, "/api/2.0/mlflow/logged-models/search", {"experiment_ids": ["0"]})["models"]
    by_run = {m["info"]["source_run_id"]: m["info"] for m in models}
    for run in runs.values():
        run_id = run["info"]["run_id"]
        model = by_run[run_id]
        # Named `model`, so runs:/<run_id>/model finds it; its run's name, as a tag, tells it apart.
        assert model["name"] == "model" and model["status"] == "LOGGED_MODEL_READY"
        assert {"key": "cnnexp.run_name", "value": run["info"]["run_name"]} in model["tags"]
        files = f"{url}/ajax-api/2.0/mlflow/logged-models/{model['model_id']}/artifacts/files?artifact_file_path=MLmodel"
        with urllib.request.urlopen(files, timeout=30) as response:
            assert b"pytorch" in response.read()


def test_system_metrics_reach_the_server_when_asked(trained):
    _, runs, _ = trained
    metrics = {m["key"] for m in runs[0.02]["data"]["metrics"]}
    assert "system/cpu_utilization_percentage" in metrics
    assert not any(k.startswith("system/") for k in (m["key"] for m in runs[0.01]["data"]["metrics"]))


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_the_ui_runs_table_shows_both_runs(trained):
    url, runs, _ = trained
    dom = chromium(f"{url}/#/experiments/0/runs", "--dump-dom")
    for run in runs.values():
        assert run["info"]["run_name"] in dom
