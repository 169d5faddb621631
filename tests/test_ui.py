"""``lmat ui`` (issue 14): what it serves, its partitions, its quiet log, and a stop within 5 s.

The launcher tests run the real command on the shared tiny demo (``demo_fixtures``); the one
that needs no materialized graph marks the demo as prepared, so it measures ``dagster dev``'s
start and stop, not the bootstrap (``tests/test_ui_browser.py`` runs the whole first start).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lmat_platform.exceptions import LmatError
from lmat_platform.ui import (
    PREPARED,
    _descendants,
    demo_target,
    home_target,
    resolve_target,
    stop_process_group,
)
from tests.demo_fixtures import VENV, TinyDemo, build_tiny_demo, clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> TinyDemo:
    return build_tiny_demo(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serves_the_demo_in_the_current_folder_or_says_what_it_serves(
    demo: TinyDemo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(demo.cwd)
    t, msg = resolve_target(None, None)
    assert t.kind == "demo" and t.store == demo.dir / "store"
    assert msg == f"serving the demo's store {demo.dir / 'store'}, 2023-11-15 to 2023-11-16"
    env = t.env()
    assert env["LMAT_STORE"] == str(demo.dir / "store")
    assert env["LMAT_TENANTS"] == str(demo.dir / "tenants.yaml")
    assert (Path(env["LMAT_OUTPUTS"]) / "thin" / "log").is_dir()  # the asset's thin_uri("log")
    assert (env["LMAT_FIRST_DAY"], env["LMAT_LAST_DAY"]) == ("2023-11-15", "2023-11-16")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMAT_HOME", str(tmp_path / "home"))
    t, msg = resolve_target(None, None)
    assert t == home_target(tmp_path / "home")
    assert msg.startswith(f"no demo in {tmp_path / 'lmat-demo'} (run 'lmat demo' there")
    assert "serving a generated workload's store" in msg
    with pytest.raises(LmatError, match="--demo: .* holds no finished 'lmat demo'"):
        demo_target(tmp_path)


def test_partitions_run_from_the_first_landed_day_to_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from assets.partitions import _env_day, daily_partitions

    keys = daily_partitions("2023-11-15", "2023-11-18").get_partition_keys()
    assert keys == ["2023-11-15", "2023-11-16", "2023-11-17", "2023-11-18"]
    monkeypatch.setenv("LMAT_FIRST_DAY", "15/11/2023")
    with pytest.raises(LmatError, match="LMAT_FIRST_DAY: expected a date YYYY-MM-DD, but got"):
        _env_day("LMAT_FIRST_DAY")
    with pytest.raises(LmatError, match="LMAT_LAST_DAY: 2023-11-14 is before"):
        daily_partitions("2023-11-15", "2023-11-14")


def test_metadata_timestamps_have_an_iso_form() -> None:
    from assets.partitions import iso_us

    assert iso_us(1_700_006_400_000_000) == "2023-11-15T00:00:00Z"
    assert iso_us(1_700_020_800_000_123) == "2023-11-15T04:00:00.000123Z"


def test_stop_process_group_ends_a_stubborn_tree_within_its_grace(tmp_path: Path) -> None:
    """A leader that ignores SIGTERM, a child in its group and a grandchild in a session of its
    own: all gone within the grace period plus a moment."""
    script = (
        "trap '' TERM; sleep 600 & setsid bash -c \"trap '' TERM; sleep 600\" & "
        "echo ready; wait"
    )
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while len(tree := _descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tree) >= 2, tree
    t0 = time.monotonic()
    stop_process_group(proc, grace_s=1.0)
    took = time.monotonic() - t0
    assert took < 2.5
    time.sleep(0.2)
    alive = [p for p in tree if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [] and proc.poll() is not None


def _launch(demo: TinyDemo, port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(VENV / "bin" / "lmat"), "ui", "--demo", str(demo.dir), "--port", str(port)],
        cwd=demo.cwd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
        start_new_session=True,
    )


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = log.read_text(errors="replace")
        if text in got:
            return got
        assert proc.poll() is None, f"lmat ui exited ({proc.returncode}):\n{got[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_ui_is_quiet_and_stops_everything_within_5_seconds(
    demo: TinyDemo, tmp_path: Path, sig: signal.Signals
) -> None:
    prepared = demo.dir / PREPARED
    fake = not prepared.exists()  # the browser test may have made the real one already
    if fake:
        prepared.write_text(json.dumps({"note": "marked prepared by tests/test_ui.py"}))
    port, log = free_port(), tmp_path / "ui.err"
    proc = _launch(demo, port, log)
    try:
        text = _wait_for(log, "ready: open", proc, timeout_s=240)
        lines = text.strip().splitlines()
        # Quiet: only the launcher's own lines (what it serves, where the logs are, the URL).
        assert all(ln.startswith("lmat ui: ") for ln in lines), text
        assert len(lines) <= 4, text
        assert lines[0] == f"lmat ui: serving the demo's store {demo.dir / 'store'}, " \
            "2023-11-15 to 2023-11-16"
        assert f"http://127.0.0.1:{port}" in text
        tree = [proc.pid, *_descendants(proc.pid)]
        assert len(tree) >= 4  # launcher, dagster dev, its webserver, daemon and code servers
        t0 = time.monotonic()
        os.kill(proc.pid, sig)  # Ctrl-C in a terminal sends SIGINT to the launcher
        proc.wait(timeout=10)
        gone_at = None
        while time.monotonic() - t0 < 10:
            if not any(_alive_pid(p) for p in tree):
                gone_at = time.monotonic() - t0
                break
            time.sleep(0.05)
        assert gone_at is not None and gone_at < 5.0, f"still running after {gone_at} s"
        assert proc.returncode == 0
        assert "lmat ui: stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            stop_process_group(proc)
        if fake:
            prepared.unlink()


def _alive_pid(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
