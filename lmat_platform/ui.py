"""``lmat ui``: the Dagster UI on a local home with the demo's data already materialized.

Layout of the home (``$LMAT_HOME``, default ``~/.lmat/ui``)::

    HOME/
      landing/events/DATE.parquet     generated event files, one per day (what producers drop)
      landing/requests/DATE.parquet   generated request files
      store/                          the lmat store
      outputs/                        thin tables, fat-row baselines, reports, the model
      dagster_home/dagster.yaml       the Dagster instance (runs, materializations, check results)
      .prepared                       written once the graph was materialized

The first launch writes the landing files and materializes the whole asset graph once (running
``python -m jobs.bootstrap`` in the project, so that this library never imports the Dagster
code); later launches reuse it. Then ``dagster dev`` serves the project's ``workspace.yaml`` in
its own process group, which is stopped as a whole when the launcher is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from lmat_platform.exceptions import LmatError
from lmat_platform.synth import WorkloadConfig, day_bounds, write_workload

log = logging.getLogger(__name__)

#: The workload the UI shows: small enough to materialize in about a minute on 2 cores.
UI_WORKLOAD = WorkloadConfig(
    seed=0, n_users=200, n_items=5000, days=4, events_per_day=5000, requests_per_day=800
)
PREPARED = ".prepared"


def default_home() -> Path:
    return Path(os.environ.get("LMAT_HOME") or Path.home() / ".lmat" / "ui")


def project_root() -> Path:
    """The checkout holding ``workspace.yaml``, ``assets/`` and ``jobs/`` (the package's parent,
    else the current directory)."""
    for cand in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (cand / "workspace.yaml").is_file() and (cand / "jobs").is_dir():
            return cand
    raise LmatError(
        "lmat ui: no workspace.yaml found next to the lmat_platform package or in the current "
        "directory; run it from an lmat checkout"
    )


def day_key(cfg: WorkloadConfig, day: int) -> str:
    """The daily partition key (UTC date) of a synthetic day."""
    import datetime as dt

    start, _ = day_bounds(cfg, day)
    return dt.datetime.fromtimestamp(start / 1e6, dt.UTC).date().isoformat()


def land_workload(
    cfg: WorkloadConfig,
    landing: str | os.PathLike[str],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Generate ``cfg`` and drop its files in a landing folder named by day
    (``events/DATE.parquet``, ``requests/DATE.parquet``); returns the dates, oldest first."""
    landing = Path(landing)
    work = landing / ".synth"
    wl = write_workload(cfg, work, progress=progress)
    days = []
    for day, (ev, rq) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
        key = day_key(cfg, day)
        for kind, src in (("events", ev), ("requests", rq)):
            dest = landing / kind / f"{key}.parquet"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)  # a rename: the landing sensor never sees half a file
        days.append(key)
    shutil.rmtree(work)
    return days


def ui_env(home: Path) -> dict[str, str]:
    """The environment the Dagster processes of ``lmat ui`` run with."""
    env = dict(os.environ)
    for k in ("LMAT_STORE", "LMAT_LANDING", "LMAT_OUTPUTS", "LMAT_TENANTS"):
        env.pop(k, None)
    env["LMAT_HOME"] = str(home)
    env["DAGSTER_HOME"] = str(home / "dagster_home")
    root = str(project_root())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def prepare_home(home: Path, *, cfg: WorkloadConfig = UI_WORKLOAD, fresh: bool = False) -> dict:
    """Land the demo workload in ``home`` and materialize the asset graph once (idempotent)."""
    marker = home / PREPARED
    if fresh and home.exists():
        if not marker.exists() and any(home.iterdir()):
            raise LmatError(f"{home}: not made by 'lmat ui'; refusing to delete it")
        shutil.rmtree(home)
    if marker.exists():
        return json.loads(marker.read_text())
    dh = home / "dagster_home"
    dh.mkdir(parents=True, exist_ok=True)
    (dh / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    if not any((home / "landing" / "events").glob("*.parquet")):
        days = land_workload(cfg, home / "landing")
    else:
        days = sorted(p.stem for p in (home / "landing" / "events").glob("*.parquet"))
    log.info("lmat ui: materializing the asset graph for %d days in %s", len(days), home)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.bootstrap"], cwd=project_root(), env=ui_env(home), check=False
    )
    if proc.returncode != 0:
        raise LmatError(
            f"lmat ui: materializing the asset graph failed (exit {proc.returncode}); "
            f"see the log above"
        )
    events = sum(
        pq.read_metadata(p).num_rows for p in (home / "landing" / "events").glob("*.parquet")
    )
    info = {"home": str(home), "days": days, "landed_events": events, "workload": asdict(cfg)}
    marker.write_text(json.dumps(info, indent=2))
    return info


def dagster_dev_command(*, host: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("dagster")
    cmd = [str(exe)] if exe.exists() else [shutil.which("dagster") or "dagster"]
    return [*cmd, "dev", "-w", str(project_root() / "workspace.yaml"), "-h", host, "-p", str(port)]


def launch_ui(
    home: str | None = None,
    *,
    port: int = 3000,
    prepare: bool = True,
    host: str = "127.0.0.1",
    fresh: bool = False,
) -> int:
    """Prepare the UI's home (unless ``prepare`` is False), then serve ``dagster dev`` until it
    exits or the launcher is interrupted; returns its exit code."""
    h = Path(home).expanduser() if home else default_home()
    if prepare:
        prepare_home(h, fresh=fresh)
    else:
        (h / "dagster_home").mkdir(parents=True, exist_ok=True)
        if not (h / "dagster_home" / "dagster.yaml").exists():
            (h / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    cmd = dagster_dev_command(host=host, port=port)
    log.info("lmat ui: serving http://%s:%d (%s)", host, port, " ".join(cmd))
    # Its own session and process group: `dagster dev` spawns the webserver, the daemon and code
    # servers, and started without a terminal it ignores SIGINT; stopping the group stops all.
    proc = subprocess.Popen(cmd, cwd=project_root(), env=ui_env(h), start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_process_group(proc))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_process_group(proc)
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """Stop the process group of ``proc``: SIGINT (dagster dev's graceful shutdown), then
    SIGTERM, then SIGKILL, each after ``timeout_s`` without an exit."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader exited; take down whatever it left behind in its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
