"""The Dagster UI in headless Chromium: the lmat assets and checks are on its pages.

Starts ``dagster dev`` on the project's workspace.yaml in its own process group (stopped by its
id), drives Debian's chromium over the DevTools protocol (``websockets`` comes with
dagster-webserver), expands every asset group on the global lineage page, saves a screenshot
under the test's tmp folder, and reads the checks off each asset's Checks tab.
"""

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmat_platform.ui import stop_process_group
from tests.test_dagster_defs import ASSETS, CHECKS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
COMMUNITY_DIALOG = "Join the Dagster community"
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "LMAT_HOME": str(tmp_path / "lmat")}
    log = open(tmp_path / "dagster_dev.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster")),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "dagster dev did not serve /server_info:\n"
                    + (tmp_path / "dagster_dev.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


class Browser:
    """Just enough of the Chrome DevTools protocol: navigate, keys, clicks, text, screenshot."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.n = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        mid = self.n
        await self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def text(self) -> str:
        r = await self.call(
            "Runtime.evaluate",
            expression="document.body ? document.body.innerText : ''",
            returnByValue=True,
        )
        return str(r["result"].get("value", ""))

    async def wait_for(self, words: list[str], timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = await self.text()
            if all(w in text for w in words) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.3)

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def click_text(self, label: str) -> None:
        js = (
            "for (const b of document.querySelectorAll('button')) "
            f"if (b.innerText.trim() === {json.dumps(label)}) {{ b.click(); break; }}"
        )
        await self.call("Runtime.evaluate", expression=js)

    async def alt_key(self, letter: str) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            await self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                modifiers=1,
                key=letter,
                code=f"Key{letter.upper()}",
                windowsVirtualKeyCode=ord(letter.upper()),
            )

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


async def _drive(url: str, profile: Path, out: Path) -> dict[str, str]:
    import websockets

    proc = subprocess.Popen(
        [
            CHROMIUM,
            *CHROME_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1800,1100",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as r:
            targets = json.load(r)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        pages: dict[str, str] = {}
        async with websockets.connect(ws_url, max_size=64 << 20) as ws:
            b = Browser(ws)
            await b.call("Page.enable")
            await b.call(
                "Emulation.setDeviceMetricsOverride",
                width=1800,
                height=1100,
                deviceScaleFactor=1,
                mobile=False,
            )
            groups = sorted({g for g, _, _ in ASSETS.values()})
            await b.goto(f"{url}/asset-groups")
            await b.wait_for(["Global asset lineage", *groups])
            await b.alt_key("e")  # expand all groups
            pages["graph"] = await b.wait_for(list(ASSETS))
            # The first-visit "join the community" dialog covers the graph: skip it.
            await b.wait_for([COMMUNITY_DIALOG], timeout_s=5)
            for _ in range(20):
                if COMMUNITY_DIALOG not in await b.text():
                    break
                await b.click_text("Skip")
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.0)  # let the graph settle before the picture
            await b.screenshot(out)
            for asset in sorted({c.split(":")[0] for c in CHECKS}):
                names = [c.split(":")[1] for c in CHECKS if c.startswith(f"{asset}:")]
                await b.goto(f"{url}/assets/{asset}?view=checks")
                pages[asset] = await b.wait_for(names, timeout_s=20)
        return pages
    finally:
        stop_process_group(proc)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)
def test_asset_graph_shows_lmat_assets_and_checks(dagster_dev: str, tmp_path: Path) -> None:
    shot = tmp_path / "asset_graph.png"
    pages = asyncio.run(_drive(dagster_dev, tmp_path / "chromium-profile", shot))
    missing_assets = [a for a in ASSETS if a not in pages["graph"]]
    assert missing_assets == [], pages["graph"][:2000]
    for check in CHECKS:
        asset, name = check.split(":")
        assert name in pages[asset], f"check {check} not on its asset's page"
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    if os.environ.get("LMAT_DOCS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LMAT_DOCS_SCREENSHOT"])
