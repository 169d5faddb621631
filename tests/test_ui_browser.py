"""``lmat ui`` on the demo's store, in headless Chromium (issue 14).

Runs the real launcher (``lmat ui --demo DIR``) on the shared tiny demo (``demo_fixtures``): its
first start materializes the asset graph on the demo's store and runs every check, then serves
``dagster dev``. The test reads the instance the UI reads (every asset materialized, each
daily asset in every landed day and only those, every check's latest execution passed), then
drives Debian's chromium over the DevTools protocol (``websockets`` comes with
dagster-webserver): the global asset graph with all groups expanded, and the partitions view of
``raw_events``. Screenshots go to the test's tmp folder; with ``LMAT_DOCS_SCREENSHOTS=1`` they
are also copied to ``docs/ui_assets.png`` and ``docs/ui_partitions.png``.

Slow (a first start materializes everything: about a minute on an idle 2-core machine): run it
with ``pytest -m browser`` or ``-m slow``; ``.ci/run`` does.
"""

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmat_platform.ui import PREPARED, stop_process_group
from tests.demo_fixtures import VENV, TinyDemo, build_tiny_demo, clean_env
from tests.test_dagster_defs import ASSETS, CHECKS

# A first start on a busy 2-core machine can take 10 minutes (about one when idle).
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1800)]

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
#: External assets: files producers drop, never materialized by Dagster.
EXTERNAL = {"landing_events", "landing_requests"}
#: The groups of the main flow, which the first start materializes (summaries and real data
#: have jobs of their own).
MAIN_GROUPS = {"ingest", "uih", "examples", "tenants", "reports", "training"}
MAIN = sorted(a for a, (group, _, _) in ASSETS.items() if group in MAIN_GROUPS)
#: Names of the graph's nodes drawn as materialized (Dagster's green border).
GREEN_NODES_JS = """
(() => { const names = new Set();
  for (const el of document.querySelectorAll('div')) {
    if (getComputedStyle(el).borderColor === 'rgb(46, 204, 129)' && el.innerText)
      names.add(el.innerText.trim());
  }
  return JSON.stringify([...names].sort()); })()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> TinyDemo:
    return build_tiny_demo(tmp_path_factory)


@pytest.fixture
def lmat_ui(demo: TinyDemo, tmp_path: Path) -> Iterator[str]:
    """``lmat ui --demo DIR`` from the demo's folder, until the test ends."""
    prepared = demo.dir / PREPARED
    if prepared.exists() and "note" in json.loads(prepared.read_text()):
        prepared.unlink()  # a marker another test wrote without materializing
    port = _free_port()
    err = tmp_path / "lmat_ui.err"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [str(VENV / "bin" / "lmat"), "ui", "--demo", str(demo.dir), "--port", str(port)],
            cwd=demo.cwd,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 1500
        while "lmat ui: ready" not in err.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"lmat ui did not get ready:\n{err.read_text()[-3000:]}")
            time.sleep(1)
        text = err.read_text()
        assert "failed" not in text, text
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


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

    async def skip_dialog(self) -> None:
        """The first-visit "join the community" dialog covers the page: skip it."""
        await self.wait_for([COMMUNITY_DIALOG], timeout_s=5)
        for _ in range(20):
            if COMMUNITY_DIALOG not in await self.text():
                break
            await self.click_text("Skip")
            await asyncio.sleep(0.25)

    async def green_nodes(self, want: list[str], timeout_s: float = 90) -> list[str]:
        """Wait until every node of ``want`` is drawn as materialized; returns those that are."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = await self.call("Runtime.evaluate", expression=GREEN_NODES_JS, returnByValue=True)
            green = [n for n in json.loads(r["result"]["value"]) if n in ASSETS]
            if set(want) <= set(green) or time.monotonic() > deadline:
                return green
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


async def _drive(url: str, profile: Path, out: Path) -> dict[str, str]:
    import websockets

    proc = subprocess.Popen(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1800,1100",
         "about:blank"],
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
            await b.call("Emulation.setDeviceMetricsOverride", width=1800, height=1100,
                         deviceScaleFactor=1, mobile=False)
            groups = sorted({g for g, _, _ in ASSETS.values()})
            await b.goto(f"{url}/asset-groups")
            await b.wait_for(["Global asset lineage", *groups], timeout_s=60)
            await b.alt_key("e")  # expand all groups
            pages["graph"] = await b.wait_for(list(ASSETS), timeout_s=60)
            await b.skip_dialog()
            # Status arrives after the graph is drawn: wait for the main assets' green.
            pages["green"] = json.dumps(await b.green_nodes(MAIN))
            await asyncio.sleep(1.0)
            pages["graph"] = await b.text()
            await b.screenshot(out / "ui_assets.png")

            await b.goto(f"{url}/assets/raw_events?view=partitions")
            pages["partitions"] = await b.wait_for(["2023-11-15", "2023-11-16"], timeout_s=60)
            await asyncio.sleep(1.0)
            pages["partitions"] = await b.text()
            await b.screenshot(out / "ui_partitions.png")

            for asset in sorted({c.split(":")[0] for c in CHECKS}):
                names = [c.split(":")[1] for c in CHECKS if c.startswith(f"{asset}:")]
                await b.goto(f"{url}/assets/{asset}?view=checks")
                pages[asset] = await b.wait_for(names, timeout_s=30)
        return pages
    finally:
        stop_process_group(proc)


def _instance_state(dagster_home: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """What the UI shows, read from its instance: materializations (partition keys for daily
    assets) and each check's latest execution status."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        mats: dict[str, Any] = {}
        for name, (_, daily, _) in ASSETS.items():
            key = dg.AssetKey(name)
            if daily:
                mats[name] = sorted(inst.get_materialized_partitions(key))
            else:
                mats[name] = inst.get_latest_materialization_event(key) is not None
        checks: dict[str, str] = {}
        for c in CHECKS:
            asset, name = c.split(":")
            rec = inst.get_latest_asset_check_evaluation_record(
                dg.AssetCheckKey(dg.AssetKey(asset), name)
            )
            checks[c] = rec.status.value if rec is not None else "never run"
    return mats, checks


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)
def test_ui_on_the_demos_store(lmat_ui: str, demo: TinyDemo, tmp_path: Path) -> None:
    days = ["2023-11-15", "2023-11-16"]
    mats, checks = _instance_state(demo.dir / "dagster_home")
    for name in MAIN:
        if ASSETS[name][1]:
            assert mats[name] == days, f"{name}: materialized partitions {mats[name]}"
        else:
            assert mats[name] is True, f"{name} never materialized"
    failed = {c: s for c, s in checks.items() if s != "SUCCEEDED" and c.split(":")[0] in MAIN}
    assert failed == {}, f"checks whose latest execution did not pass: {failed}"

    pages = asyncio.run(_drive(lmat_ui, tmp_path / "chromium-profile", tmp_path))
    (tmp_path / "pages.json").write_text(json.dumps(pages, indent=1))
    graph = pages["graph"]
    assert [a for a in ASSETS if a not in graph] == [], graph[:2000]
    green = json.loads(pages["green"])
    assert [a for a in MAIN if a not in green] == [], f"drawn as materialized: {green}"
    assert not EXTERNAL & set(green)
    for check in CHECKS:
        asset, name = check.split(":")
        assert name in pages[asset], f"check {check} not on its asset's page"
        if asset in MAIN:
            # The list marks each check "Succeeded"; an asset's only check may show just its
            # open detail pane ("Evaluation result: Passed").
            only = sum(c.startswith(f"{asset}:") for c in CHECKS) == 1
            shown = f"{name}\nSucceeded" in pages[asset] or (
                only and "Evaluation result\nPassed" in pages[asset]
            )
            assert shown and "Failed" not in pages[asset], f"check {check} not shown as passed"
    # The partitions view holds the demo's two days, both materialized, and nothing else.
    part = pages["partitions"]
    assert "2 Partitions Selected" in part and "Materialized (2)" in part, part[:3000]
    assert "Missing (0)" in part and "2023-11-17" not in part, part[:3000]
    for name in ("ui_assets.png", "ui_partitions.png"):
        shot = tmp_path / name
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000, name
        if os.environ.get("LMAT_DOCS_SCREENSHOTS"):
            shutil.copyfile(shot, ROOT / "docs" / name)
