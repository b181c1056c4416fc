"""Screenshots of what a reviewer opens after ``make demo``: the MLflow parent run of the
training plan, one stage run's metrics and its artifacts, the curation run, and the curation
``report.html``. ``make screenshots`` runs it (after ``make demo``); the PNGs land in
``docs/screenshots/`` and the README links them.

How: a lean MLflow server on 127.0.0.1 (a free port) over the demo's SQLite store; headless
Chromium driven over its DevTools protocol (``Browser``): the UI's own settings are put in the
browser's storage first (the model-training layout, the assistant panel closed), then each
page is opened and taken once its text shows what it must (the run's name, its charts).
Chromium comes from the system packages (``apt-get install chromium``; ``make screenshots``
installs it when missing); the protocol client is aiohttp's websocket (installed with Ray).

    python docs/screenshots.py [DEMO_OUT] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WINDOW = (1920, 1080)
SETTLE_S = 2.0  # after a page shows its data: the charts' entry animation
ML_LAYOUT = "workflowType=machine_learning"  # the UI's model-training layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("screenshots: no Chromium found; install it with `apt-get install chromium`")


def start_mlflow(db: Path, port: int, log: Path) -> subprocess.Popen:
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    argv = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", f"sqlite:///{db}"]
    proc = subprocess.Popen(
        argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/health"
    for _ in range(240):  # the server answers, or it died: never a fixed sleep as the wait
        if proc.poll() is not None:
            sys.exit(f"screenshots: mlflow server exited; its log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    sys.exit(f"screenshots: mlflow server did not answer on {url}; its log: {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# What the UI keeps in the browser (``{key}_v{version}``, JSON): open runs in the model-training
# layout, and keep the MLflow Assistant panel (which opens itself on a first visit) closed.
LOCAL_STORAGE = {
    "mlflow.workflowType_v1": '"machine_learning"',
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): set
    the UI's local settings once, then for each page navigate, wait until its text shows what
    it must show, and capture it."""

    def __init__(self, executable: str, profile: Path):
        self.executable, self.profile = executable, profile
        self.proc: subprocess.Popen | None = None
        self.ids = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        argv = [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu"]
        argv += ["--hide-scrollbars", "--no-first-run", "--remote-debugging-port=0"]
        argv += [f"--user-data-dir={self.profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"]
        self.proc = subprocess.Popen(
            [*argv, "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                sys.exit("screenshots: Chromium exited at start")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.http.close()
        assert self.proc is not None
        stop(self.proc)

    async def call(self, method: str, **params):
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:  # events arrive in between; the answer carries our id
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def open(self, url: str, expect: list[str], timeout: float = 90.0) -> None:
        """Navigate and wait until the page's text holds every string of ``expect``."""
        await self.call("Page.navigate", url=url)
        check = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in expect)
        deadline = time.monotonic() + timeout
        while not await self.evaluate(f"!!document.body && ({check or 'true'})"):
            if time.monotonic() > deadline:
                sys.exit(f"screenshots: {url} never showed {expect}")
            await asyncio.sleep(0.25)
        await asyncio.sleep(SETTLE_S)  # charts animate in after their data arrived

    async def settings(self, base: str) -> None:
        # once the UI has started (a first visit opens the assistant and records that), so
        # that what is set here is what the next pages read
        await self.open(base + "/", ["Experiments"])
        for key, value in LOCAL_STORAGE.items():
            await self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        # the pages after this one are hash routes of the same document: start it again, so
        # that the app reads its settings back
        await self.call("Page.reload")
        await self.open(base + "/", ["Experiments"])

    async def shoot(self, url: str, expect: list[str], png: Path, height: int) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WINDOW[0],
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.open(url, expect)
        data = await self.call("Page.captureScreenshot", format="png")
        png.write_bytes(base64.b64decode(data["data"]))
        shown = png.relative_to(REPO) if png.is_relative_to(REPO) else png
        print(f"  {shown}  <- {url}")


def pages(tracking_uri: str, base: str) -> list[tuple[str, str, list[str]]]:
    """(file name, URL, text the page must show) of every page to take, found through the
    MLflow client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], max_results=200)
    if not runs:
        sys.exit(f"screenshots: no MLflow runs in {tracking_uri}; run `make demo` first")
    children = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    parents = [r for r in runs if r.info.run_id in children]
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    curation = [r for r in runs if r.info.run_id not in children and r not in stages]
    curation = [r for r in curation if r.data.metrics and "train" not in r.info.run_name.lower()]
    out = []

    def run_url(run, tab: str = "") -> str:
        exp = run.info.experiment_id
        return f"{base}/#/experiments/{exp}/runs/{run.info.run_id}{tab}?{ML_LAYOUT}"

    if parents:
        parent = max(parents, key=lambda r: r.info.start_time)
        name = parent.info.run_name
        out.append(("mlflow-parent-run.png", run_url(parent), [name, "Metrics"]))
        exp = parent.info.experiment_id
        out.append(("mlflow-experiment.png", f"{base}/#/experiments/{exp}?{ML_LAYOUT}", [name]))
        mine = [r for r in stages if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        if mine:
            stage = max(mine, key=lambda r: r.info.start_time)
            expect = [stage.info.run_name, "Step"]
            out.append(("mlflow-stage-metrics.png", run_url(stage, "/model-metrics"), expect))
            # the artifacts tab with a grid of generated samples open (the newest step's)
            grids = [f.path for f in client.list_artifacts(stage.info.run_id, "samples")]
            shown = f"/artifacts/{sorted(grids)[-1]}" if grids else "/artifacts"
            expect = [stage.info.run_name, "recipe.yaml"]
            out.append(("mlflow-stage-artifacts.png", run_url(stage, shown), expect))
    if curation:
        latest = max(curation, key=lambda r: r.info.start_time)
        expect = [latest.info.run_name, "Metrics"]
        out.append(("mlflow-curation-run.png", run_url(latest), expect))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo", nargs="?", default=str(REPO / "demo_out"), help="make demo's output")
    p.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    args = p.parse_args(argv)
    demo, out = Path(args.demo).resolve(), Path(args.out).resolve()
    db, report = demo / "mlflow.db", demo / "curation" / "report.html"
    for need in (db, report):
        if not need.exists():
            sys.exit(f"screenshots: {need} is missing; run `make demo` first")
    out.mkdir(parents=True, exist_ok=True)
    executable = chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = start_mlflow(db, port, Path(tmp) / "mlflow.log")
        try:
            print(f"screenshots of {demo} into {out}")
            shots = [
                (out / name, url, expect, WINDOW[1])
                for name, url, expect in pages(f"sqlite:///{db}", base)
            ]
            shots.append((out / "curation-report.png", report.as_uri(), ["Accepted"], 1600))
            gallery = report.as_uri() + "#accepted"  # the accepted gallery, then the rejects
            shots.append((out / "curation-report-gallery.png", gallery, ["Accepted"], 1600))

            async def take() -> None:
                async with Browser(executable, Path(tmp) / "chromium") as browser:
                    await browser.settings(base)
                    for png, url, expect, height in shots:
                        await browser.shoot(url, expect, png, height)

            asyncio.run(take())
        finally:
            stop(server)


if __name__ == "__main__":
    main()
