"""Screenshots of the MLflow UI for README.md, taken from a real `mlflow server` on loopback.

    python scripts/screenshots.py runs|study|models [--data DIR] [--out docs]

`runs`: starts a throwaway server, prepares the real Fashion-MNIST sample in DIR, trains three
short runs that differ in lr through `mlflow run`, and saves docs/runs-table.png (lr, batch_size
and accuracies side by side), docs/runs-charts.png (train and val accuracy, the three runs on
each chart) and docs/runs-val-accuracy.png (that chart opened full-size, with its legend).
`study`: the same server, an Optuna study through `mlflow run -e tune` (8 trials of 4 epochs on
2 workers, about a minute), and docs/study-table.png (the study's parent run expanded: its trials
with lr, batch_size, val_accuracy and status; a pruned trial is KILLED with pruned_at_epoch),
docs/study-charts.png (val_accuracy and val_loss, one line per trial), docs/study-val-accuracy.png
(full-size, with its legend) and docs/study-figure.png (the parent run's optimization history).
`models`: the three training runs of `runs`, each model evaluated on test, and docs/models-tab.png
(the experiment's Models tab: each model with its source run, its test metrics and its epoch's metrics).

Needs headless Chromium (Debian: `apt-get install -y chromium`) and aiohttp (MLflow's server
brings it) to drive it over the DevTools protocol: the UI only shows chosen columns and a closed
assistant panel after a click, which a plain `chromium --screenshot` cannot do.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from browser import Browser, with_browser
from mlflow_server import mlflow_server

if TYPE_CHECKING:
    from mlflow.entities import Run

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "fashion-mnist-walkthrough"
SHARE_KEY = "readme"  # the UI loads a saved view (columns, sort, chart filter) from ?viewStateShareKey=


def mlflow_run(url: str, work: Path, entry: str, **params) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=url, MLFLOW_EXPERIMENT_NAME=EXPERIMENT)
    # `mlflow run --env-manager local` runs `python ...`: make that this interpreter, venv or not.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    print("$", " ".join(args[2:]))
    subprocess.run(args, cwd=work, env=env, check=True)


def save_view(url: str, state: dict) -> str:
    """Stores a runs-page view as the experiment tag the UI's "share view" reads; returns the experiment id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(state))
    return experiment.experiment_id


async def shoot_runs_page(browser: Browser, page: str, names: list[str], shots: dict[str, Path], chart: str,
                          expanded: Path, parent: str | None = None, widths: dict[str, int] | None = None,
                          colors: dict[str, str] | None = None) -> None:
    """The saved view as a table and as charts (shots: compareRunsMode -> PNG), then `chart` full-size.

    names: the runs that must show. parent: a parent run whose row is expanded in each view first, as the
    saved view's runsExpanded does not survive loading a shared view; its child runs are in names.
    widths: runs-table columns to widen (col-id -> pixels). colors: run id -> colour.
    """
    wait_for = [parent] if parent else names
    await browser.open(page, wait_for)
    # The assistant opens itself on a first visit and takes a fifth of the width; closing it sticks.
    await browser.click("Close")
    if colors:
        await browser.set_run_colors(colors)
        await browser.wait_for(wait_for)
    for mode, png in shots.items():
        await browser.open(f"{page}&compareRunsMode={mode}", wait_for)
        await browser.click("Hide banner")  # "you are viewing a shared view"
        if parent:
            await browser.click_beside(parent)
            await browser.wait_for(names)
        for column, by_px in (widths or {}).items():
            await browser.widen_column(column, by_px)
        await browser.hide_plot_toolbars()
        await browser.screenshot(png)
    await browser.click_beside(chart)
    await browser.hide_plot_toolbars()
    await browser.screenshot(expanded)


RUNS_VIEW = {
    "selectedColumns": ["params.`lr`", "params.`batch_size`", "params.`epochs`", "metrics.`train_accuracy`",
                        "metrics.`val_accuracy`", "metrics.`val_loss`"],
    "orderByKey": "params.`lr`",
    "orderByAsc": True,
    "searchFilter": "params.lr != ''",  # training runs only: prepare has no lr
    "chartsSearchFilter": "accuracy",
    "runListHidden": True,  # charts get the width; their legends name the runs
}
LEARNING_RATES = (0.001, 0.003, 0.01)


def train_runs(url: str, work: Path, data: Path) -> None:
    """The real sample prepared, and three 8-epoch training runs that differ in lr."""
    mlflow_run(url, work, "prepare", source=data, data_dir=work / "data")
    for lr in LEARNING_RATES:
        mlflow_run(url, work, "train", lr=lr, epochs=8, data_dir=work / "data")


def shoot_runs(url: str, work: Path, data: Path, out: Path) -> None:
    train_runs(url, work, data)
    experiment_id = save_view(url, RUNS_VIEW)
    names = [f"train-lr{lr:g}-bs100" for lr in LEARNING_RATES]
    page = f"{url}/#/experiments/{experiment_id}/runs?viewStateShareKey={SHARE_KEY}"

    shots = {"TABLE": out / "runs-table.png", "CHART": out / "runs-charts.png"}
    asyncio.run(with_browser(
        lambda browser: shoot_runs_page(browser, page, names, shots, "val_accuracy", out / "runs-val-accuracy.png")))


STUDY_VIEW = {
    "selectedColumns": ["params.`lr`", "params.`batch_size`", "metrics.`val_accuracy`", "metrics.`val_loss`",
                        "tags.`pruned_at_epoch`", "metrics.`best_value`", "metrics.`trials_pruned`"],
    # The table nests child runs under their parent only when it is sorted by start time.
    "orderByKey": "attributes.start_time",
    "orderByAsc": True,
    "chartsSearchFilter": "val_",
    "runListHidden": False,  # the chart view's run list holds the parent's expand button
}
STUDY_WIDTHS = {"attributes.`Run Name`": 100, "tags.`pruned_at_epoch`": 30}  # whole trial names and header
STUDY_FIGURE = "optimization_history.png"
# Matplotlib's tab10 without its grey, which marks the parent run (its legend entry has no line).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
PARENT_COLOR = "#7f7f7f"


def study_runs(url: str) -> tuple[Run, list[Run]]:
    """The study's parent run and its trials' runs in trial order, as the tune run left them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, sorted(trials, key=lambda r: int(r.data.tags["optuna.trial_number"]))


def shoot_study(url: str, work: Path, data: Path, out: Path) -> None:
    # tune prepares the data itself (source=) inside the study's run, so the study is all the table shows.
    mlflow_run(url, work, "tune", n_trials=8, workers=2, epochs=4, source=data, data_dir=work / "data",
               storage=work / "optuna-journal.log")
    parent, trials = study_runs(url)
    colors = {t.info.run_id: color for t, color in zip(trials, itertools.cycle(PALETTE))}
    colors[parent.info.run_id] = PARENT_COLOR
    experiment_id = save_view(url, STUDY_VIEW)
    page = f"{url}/#/experiments/{experiment_id}/runs?viewStateShareKey={SHARE_KEY}"
    shots = {"TABLE": out / "study-table.png", "CHART": out / "study-charts.png"}

    async def shoot(browser: Browser) -> None:
        await shoot_runs_page(browser, page, [t.info.run_name for t in trials], shots, "val_accuracy",
                              out / "study-val-accuracy.png", parent=parent.info.run_name, widths=STUDY_WIDTHS,
                              colors=colors)
        # The run page in the UI's "Model training" mode: in the default GenAI mode it sits under "Evaluations".
        run_page = f"{url}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
        await browser.open(f"{run_page}/artifacts/{STUDY_FIGURE}?workflowType=machine_learning",
                           [STUDY_FIGURE, "summary.json"])
        await browser.screenshot(out / "study-figure.png")

    asyncio.run(with_browser(shoot))


MODELS_SIZE = (1900, 375)
MODELS_COLUMNS = {"Model name": 110, "Status": 90, "Created": 120, "Logged from": 100, "Source run": 150,
                  "Registered models": 100, "Dataset": 150}


def shoot_models(url: str, work: Path, data: Path, out: Path) -> None:
    """The experiment's Models tab: each training run's model (its best epoch's) with its linked val
    metrics and, after evaluate, its test metrics."""
    from mlflow.tracking import MlflowClient

    train_runs(url, work, data)
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for model in client.search_logged_models([experiment_id]):
        mlflow_run(url, work, "evaluate", model_uri=f"models:/{model.model_id}", data_dir=work / "data")
    page = f"{url}/#/experiments/{experiment_id}/models?workflowType=machine_learning"

    async def shoot(browser: Browser) -> None:
        # The grid draws only the columns in view: the metrics show once the assistant panel is closed
        # and the columns are narrower (the model's own val metrics, group "No dataset", come last).
        await browser.open(page, ["Source run"])
        await browser.click("Close")
        await browser.resize(*MODELS_SIZE)  # short: three models take three rows
        await browser.fit_columns(MODELS_COLUMNS, default=112)
        await browser.wait_for(["test_accuracy", "val_accuracy"])
        await browser.screenshot(out / "models-tab.png")

    asyncio.run(with_browser(shoot))


# mode -> what it trains and shoots.
MODES: dict[str, Callable[[str, Path, Path, Path], None]] = {"runs": shoot_runs, "study": shoot_study,
                                                              "models": shoot_models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=list(MODES))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist-mini",
                        help="directory of the four Fashion-MNIST IDX files [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go [default: %(default)s]")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(Path(tmp) / "server") as url:
        print(f"mlflow server at {url}")
        MODES[args.mode](url, Path(tmp), args.data.resolve(), args.out.resolve())


if __name__ == "__main__":
    main()
