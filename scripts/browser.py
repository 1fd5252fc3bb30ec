"""Headless Chromium driven over the DevTools protocol (for scripts/screenshots.py): the MLflow UI only shows
chosen columns and a closed assistant panel after a click, which a plain `chromium --screenshot` cannot do."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from mlflow_server import CHROMIUM_FLAGS, find_chromium, stop

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
        await self.wait_for(wait_for, settle_s, timeout_s)

    async def wait_for(self, texts: list[str], settle_s: float = 3.0, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = await self.js("document.body ? document.body.innerText : ''") or ""
            if all(w in text for w in texts):
                await asyncio.sleep(settle_s)  # charts animate in after the data arrives
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"the page never showed {texts}")

    async def click(self, aria_label: str) -> bool:
        clicked = await self.js(
            f"(() => {{ const b = document.querySelector('button[aria-label=\"{aria_label}\"]');"
            " if (b) b.click(); return Boolean(b); })()"
        )
        await asyncio.sleep(1)
        return clicked

    async def click_beside(self, text: str) -> bool:
        """Clicks the first button of the smallest block around the element showing text: the unlabelled
        expand button of a chart card (full-size plot with the whole legend) or of a parent run's row."""
        clicked = await self.js(
            f"""(() => {{ let e = [...document.querySelectorAll('*')].find(
                  n => n.children.length === 0 && n.textContent.trim() === '{text}');
                for (; e; e = e.parentElement) {{ const b = e.querySelector('button');
                  if (b) {{ b.click(); return true; }} }}
                return false; }})()"""
        )
        await asyncio.sleep(3)
        return clicked

    async def widen_column(self, column: str, by_px: int) -> bool:
        """Drags the runs table's column edge (ag-grid col-id, e.g. attributes.`Run Name`) to the right.

        A saved view's columnWidths does not survive loading a shared view, so this drags like a user.
        """
        selector = json.dumps(f".ag-header-cell[col-id={json.dumps(column)}] .ag-header-cell-resize")  # ids may hold quotes
        edge = await self.js(
            f"""(() => {{ const h = document.querySelector({selector});
                if (!h) return null; const r = h.getBoundingClientRect();
                return [r.x + r.width / 2 - 2, r.y + r.height / 2]; }})()"""  # -2: else it lands on the next header
        )
        if edge is None:
            return False
        x, y = edge
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        await self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        for step in range(1, 11):  # ag-grid follows mouse moves, not a jump
            await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x + by_px * step / 10, y=y,
                            button="left", buttons=1)
            await asyncio.sleep(0.05)
        await self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x + by_px, y=y, button="left", clickCount=1)
        await asyncio.sleep(1)
        return True

    async def fit_columns(self, widths: dict[str, int], default: int) -> None:
        """Drags every header column (by its text) to widths.get(text, default) pixels. The grid draws only
        the columns in view, so this goes round until no drawn column is left to resize."""
        done: set[str] = set()
        while True:
            columns = await self.js("""[...document.querySelectorAll('.ag-header-cell[col-id]')].map(
                c => [c.getAttribute('col-id'), c.getBoundingClientRect().width, c.innerText.trim()])""")
            todo = [(col, width, text) for col, width, text in columns if col not in done]
            if not todo:
                return
            for column, width, text in todo:
                done.add(column)
                await self.widen_column(column, round(widths.get(text, default) - width))

    async def set_run_colors(self, colors: dict[str, str]) -> None:
        """Run id -> CSS colour, where the UI keeps the colours a user picks; it reads them on a page load.

        Otherwise colours follow a hash of the run id, and eight runs often get several near-identical reds.
        """
        await self.js(f"localStorage.setItem('experimentRunColors', {json.dumps(json.dumps(colors))})")
        await self.send("Page.reload")

    async def resize(self, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)

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
                    await browser.resize(WIDTH, HEIGHT)
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
