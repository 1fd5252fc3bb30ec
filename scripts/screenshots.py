"""Screenshots of the MLflow UI for README.md, taken from a real `mlflow server` on loopback.

    python scripts/screenshots.py runs [--data DIR] [--out docs]

`runs`: starts a throwaway server, prepares the real Fashion-MNIST sample in DIR, trains three
short runs that differ in lr through `mlflow run`, and saves docs/runs-table.png (lr, batch_size
and accuracies side by side), docs/runs-charts.png (train and val accuracy, the three runs on
each chart) and docs/runs-val-accuracy.png (that chart opened full-size, with its legend).
A `study` mode (the tuning parent run and its trials) plugs into MODES the same way.

Needs headless Chromium (Debian: `apt-get install -y chromium`) and aiohttp (MLflow's server
brings it) to drive it over the DevTools protocol: the UI only shows chosen columns and a closed
assistant panel after a click, which a plain `chromium --screenshot` cannot do.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from mlflow_server import CHROMIUM_FLAGS, find_chromium, mlflow_server, stop

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "fashion-mnist-walkthrough"
SHARE_KEY = "readme"  # the UI loads a saved view (columns, sort, chart filter) from ?viewStateShareKey=
WIDTH, HEIGHT = 1600, 900


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, run JS, wait for text, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        async for message in self.ws:
            reply = json.loads(message.data)
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise RuntimeError("chromium closed the DevTools connection")

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def open(self, url: str, wait_for: list[str], settle_s: float = 3.0, timeout_s: float = 90) -> None:
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = await self.js("document.body ? document.body.innerText : ''") or ""
            if all(w in text for w in wait_for):
                await asyncio.sleep(settle_s)  # charts animate in after the data arrives
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{url} never showed {wait_for}")

    async def click(self, aria_label: str) -> bool:
        clicked = await self.js(
            f"(() => {{ const b = document.querySelector('button[aria-label=\"{aria_label}\"]');"
            " if (b) b.click(); return Boolean(b); })()"
        )
        await asyncio.sleep(1)
        return clicked

    async def expand_chart(self, title: str) -> bool:
        """Opens a chart card full-size (its first, unlabelled button): a large plot with the whole legend."""
        clicked = await self.js(
            f"""(() => {{ let e = [...document.querySelectorAll('*')].find(
                  n => n.children.length === 0 && n.textContent.trim() === '{title}');
                for (; e; e = e.parentElement) {{ const b = e.querySelector('button');
                  if (b) {{ b.click(); return true; }} }}
                return false; }})()"""
        )
        await asyncio.sleep(3)
        return clicked

    async def hide_plot_toolbars(self) -> None:
        # Plotly's zoom toolbar shows over every chart in a headless window; it only hides data.
        await self.js("document.head.insertAdjacentHTML('beforeend', '<style>.modebar{display:none!important}</style>')")

    async def screenshot(self, path: Path) -> None:
        data = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"wrote {path}")


async def with_browser(action: Callable[[Browser], object]) -> None:
    binary = find_chromium()
    if binary is None:
        sys.exit("screenshots: chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            port = await _devtools_port(Path(profile))
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    page = next(t for t in await response.json() if t["type"] == "page")
                async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    browser = Browser(ws)
                    await browser.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                                       deviceScaleFactor=1, mobile=False)
                    await action(browser)
        finally:
            stop(process)


async def _devtools_port(profile: Path, timeout_s: float = 30) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while not marker.exists() or not marker.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError("chromium did not open its DevTools port")
        await asyncio.sleep(0.2)
    return int(marker.read_text().split()[0])


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


def shoot_runs(url: str, work: Path, data: Path, out: Path) -> None:
    mlflow_run(url, work, "prepare", source=data, data_dir=work / "data")
    for lr in LEARNING_RATES:
        mlflow_run(url, work, "train", lr=lr, epochs=8, data_dir=work / "data")
    experiment_id = save_view(url, RUNS_VIEW)
    names = [f"train-lr{lr:g}-bs100" for lr in LEARNING_RATES]
    page = f"{url}/#/experiments/{experiment_id}/runs?viewStateShareKey={SHARE_KEY}"

    async def shoot(browser: Browser) -> None:
        await browser.open(page, names)
        # The assistant opens itself on a first visit and takes a fifth of the width; closing it sticks.
        await browser.click("Close")
        for mode, png in (("TABLE", "runs-table.png"), ("CHART", "runs-charts.png")):
            await browser.open(f"{page}&compareRunsMode={mode}", names)
            await browser.click("Hide banner")  # "you are viewing a shared view"
            await browser.hide_plot_toolbars()
            await browser.screenshot(out / png)
        await browser.expand_chart("val_accuracy")
        await browser.hide_plot_toolbars()
        await browser.screenshot(out / "runs-val-accuracy.png")

    asyncio.run(with_browser(shoot))


# mode -> what it trains and shoots; the tuning study's parent run with its trials goes here as "study".
MODES: dict[str, Callable[[str, Path, Path, Path], None]] = {"runs": shoot_runs}


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
