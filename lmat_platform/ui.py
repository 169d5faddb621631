"""``lmat ui``: the Dagster UI on the demo's store, with its asset graph materialized.

What it serves, in order:

1. ``--demo DIR``, or ``./lmat-demo`` when it holds a finished ``lmat demo``: the demo's own
   store, thin tables, tenants and landed files (``LMAT_OUTPUTS`` is the demo folder, so the
   thin tables are ``DIR/thin/log`` and ``DIR/thin/examples``). Dagster's files go beside them::

       DIR/dagster_home/               the Dagster instance (runs, materializations, checks)
       DIR/dagster_home/*.log          the bootstrap's and ``dagster dev``'s logs
       DIR/fat_rows/, reports/, models/  what the storage report and the training asset write
       DIR/.lmat-ui                    written once the graph was materialized

2. otherwise ``--home DIR`` (default ``$LMAT_HOME`` or ``~/.lmat/ui``): a small workload of its
   own, generated on first use into ``HOME/landing``, with ``HOME/store`` and ``HOME/outputs``.

The first launch materializes the whole asset graph once (``python -m jobs.bootstrap`` in the
project, so that this library never imports the Dagster code). On the demo's store the daily
assets find their days already ingested, published and logged and only record them. Then
``dagster dev`` serves the project's ``workspace.yaml``. The daily partitions run from the
data's first landed day to its last (``LMAT_FIRST_DAY`` / ``LMAT_LAST_DAY``).

Both child processes run in their own session; the launcher stops each whole process group on
Ctrl-C or SIGTERM within :data:`STOP_GRACE_S` plus a moment (SIGTERM, then SIGKILL). Their logs
go to files unless ``verbose``; what the launcher says goes through ``say``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow.parquet as pq

from lmat_platform.exceptions import LmatError
from lmat_platform.synth import WorkloadConfig, day_bounds, write_workload

log = logging.getLogger(__name__)

#: The workload ``lmat ui`` generates when there is no demo: about a minute to materialize.
UI_WORKLOAD = WorkloadConfig(
    seed=0, n_users=200, n_items=5000, days=4, events_per_day=5000, requests_per_day=800
)
#: Written by ``lmat demo`` in its folder (it refuses to delete a folder without it).
DEMO_MARKER = ".lmat-demo"
#: Written by ``lmat ui`` once the asset graph of a folder was materialized.
PREPARED = ".lmat-ui"
#: Seconds a stopped child group gets after SIGTERM before SIGKILL.
STOP_GRACE_S = 1.0
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class _Stop(Exception):
    """SIGTERM reached the launcher."""


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


def landed_days(landing: Path) -> list[str]:
    """Dates of the landed event files (``events/DATE*.parquet``), oldest first."""
    folder = landing / "events"
    days = {p.name[:10] for p in folder.glob("*.parquet")} if folder.is_dir() else set()
    return sorted(d for d in days if _DAY.match(d))


@dataclass(frozen=True)
class UiTarget:
    """What ``lmat ui`` serves: a store, its landing folder, outputs and tenants."""

    kind: Literal["demo", "home"]
    root: Path
    store: Path
    landing: Path
    outputs: Path
    tenants: Path | None

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    def env(self) -> dict[str, str]:
        """The environment of the Dagster processes: where the data is, and its days."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMAT_")}
        env |= {
            "LMAT_HOME": str(self.root),
            "LMAT_STORE": str(self.store),
            "LMAT_LANDING": str(self.landing),
            "LMAT_OUTPUTS": str(self.outputs),
            "DAGSTER_HOME": str(self.dagster_home),
        }
        if self.tenants is not None:
            env["LMAT_TENANTS"] = str(self.tenants)
        days = landed_days(self.landing)
        if days:
            env["LMAT_FIRST_DAY"], env["LMAT_LAST_DAY"] = days[0], days[-1]
        root = str(project_root())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        return env

    def describe(self) -> str:
        days = landed_days(self.landing)
        span = f", {days[0]} to {days[-1]}" if days else ""
        what = "the demo's store" if self.kind == "demo" else "a generated workload's store"
        return f"{what} {self.store}{span}"


def demo_target(demo_dir: str | os.PathLike[str]) -> UiTarget:
    """The demo folder ``demo_dir`` as a target; :class:`LmatError` if it holds no demo."""
    d = Path(demo_dir).expanduser().absolute()
    missing = [p for p in (DEMO_MARKER, "store", "tenants.yaml", "thin/log", "thin/examples")
               if not (d / p).exists()]
    if missing:
        raise LmatError(
            f"--demo: {d} holds no finished 'lmat demo' (missing {', '.join(missing)}); "
            f"run 'lmat demo --dir {d}' first"
        )
    return UiTarget("demo", d, d / "store", d / "landing", d, d / "tenants.yaml")


def home_target(home: str | os.PathLike[str] | None = None) -> UiTarget:
    h = Path(home).expanduser().absolute() if home else default_home()
    return UiTarget("home", h, h / "store", h / "landing", h / "outputs", None)


def resolve_target(demo: str | None, home: str | None) -> tuple[UiTarget, str]:
    """The target to serve and a sentence saying what it is and why."""
    if demo is not None:
        t = demo_target(demo)
        return t, f"serving {t.describe()}"
    if home is not None:
        t = home_target(home)
        return t, f"serving {t.describe()} (--home)"
    here = Path.cwd() / "lmat-demo"
    if (here / DEMO_MARKER).exists():
        with contextlib.suppress(LmatError):
            t = demo_target(here)
            return t, f"serving {t.describe()}"
    t = home_target()
    return t, (
        f"no demo in {here} (run 'lmat demo' there, or pass --demo DIR), so serving "
        f"{t.describe()} instead"
    )


def _write_instance_yaml(dagster_home: Path) -> None:
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n")


def _say_nothing(_msg: str) -> None:
    pass


def prepare(
    target: UiTarget,
    *,
    cfg: WorkloadConfig = UI_WORKLOAD,
    verbose: bool = False,
    say: Callable[[str], None] = _say_nothing,
) -> dict[str, Any]:
    """Materialize the asset graph of ``target`` once (generating a workload first for a home
    with nothing landed); returns what was prepared. Idempotent."""
    marker = target.root / PREPARED
    if marker.exists():
        return dict(json.loads(marker.read_text()))
    _write_instance_yaml(target.dagster_home)
    if target.kind == "home" and not landed_days(target.landing):
        say(f"generating {cfg.days} days of events and requests into {target.landing}")
        land_workload(cfg, target.landing)
    days = landed_days(target.landing)
    logfile = target.dagster_home / "bootstrap.log"
    say(
        f"first start: materializing the asset graph and running its checks for {len(days)} days "
        f"(a minute or more on 2 cores; log: {'here' if verbose else logfile})"
    )
    t0 = time.monotonic()
    code = _run_child(
        [sys.executable, "-m", "jobs.bootstrap"], target.env(), None if verbose else logfile
    )
    events = sum(pq.read_metadata(p).num_rows for p in (target.landing / "events").glob("*.parquet"))
    info = {"root": str(target.root), "kind": target.kind, "days": days, "landed_events": events,
            "seconds": round(time.monotonic() - t0, 1), "ok": code == 0}
    if target.kind == "home":
        info["workload"] = asdict(cfg)
    if code != 0:
        # Serve anyway: the UI shows which step failed and why; the next start tries again.
        say(
            f"materializing the asset graph failed in {info['seconds']} s (exit {code}); the UI "
            "shows which step failed, and "
            + ("the log above says why" if verbose else f"{logfile} says why")
        )
        return info
    marker.write_text(json.dumps(info, indent=2))
    say(f"materialized in {info['seconds']} s")
    return info


def prepare_home(
    home: Path, *, cfg: WorkloadConfig = UI_WORKLOAD, fresh: bool = False
) -> dict[str, Any]:
    """Generate a workload in ``home`` and materialize its asset graph once (idempotent)."""
    target = home_target(home)
    if fresh and home.exists():
        if not (home / PREPARED).exists() and any(home.iterdir()):
            raise LmatError(f"{home}: not made by 'lmat ui'; refusing to delete it")
        shutil.rmtree(home)
    return prepare(target, cfg=cfg)


def dagster_dev_command(*, host: str, port: int, verbose: bool = False) -> list[str]:
    exe = Path(sys.executable).with_name("dagster")
    cmd = [str(exe)] if exe.exists() else [shutil.which("dagster") or "dagster"]
    cmd += ["dev", "-w", str(project_root() / "workspace.yaml"), "-h", host, "-p", str(port)]
    return cmd + ([] if verbose else ["--log-level", "warning"])


def launch_ui(
    demo: str | None = None,
    home: str | None = None,
    *,
    port: int = 3000,
    host: str = "127.0.0.1",
    verbose: bool = False,
    prepare_graph: bool = True,
    say: Callable[[str], None] = _say_nothing,
) -> int:
    """Serve the Dagster UI on the demo's store (see the module docstring for what is served)
    until ``dagster dev`` exits, Ctrl-C or SIGTERM; returns its exit code (0 when stopped)."""
    target, what = resolve_target(demo, home)
    say(what)
    with _stop_on_sigterm():
        try:
            if prepare_graph:
                prepare(target, verbose=verbose, say=say)
            else:
                _write_instance_yaml(target.dagster_home)
            return _serve(target, host=host, port=port, verbose=verbose, say=say)
        except (KeyboardInterrupt, _Stop):
            say("stopped")
            return 0


def _serve(
    target: UiTarget, *, host: str, port: int, verbose: bool, say: Callable[[str], None]
) -> int:
    logfile = target.dagster_home / "dagster_dev.log"
    url = f"http://{host}:{port}"
    with _child(dagster_dev_command(host=host, port=port, verbose=verbose), target.env(),
                None if verbose else logfile) as proc:
        say(f"starting Dagster at {url}" + ("" if verbose else f" (its log: {logfile})"))
        while proc.poll() is None:
            if _answers(f"{url}/server_info"):
                say(f"ready: open {url} (Ctrl-C stops it)")
                break
            time.sleep(0.5)
        code = proc.wait()
    if code != 0 and not verbose and logfile.exists():
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        say(f"dagster dev exited with code {code}; the end of its log:\n" + "\n".join(tail))
    return code


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _run_child(cmd: list[str], env: dict[str, str], logfile: Path | None) -> int:
    with _child(cmd, env, logfile) as proc:
        return proc.wait()


@contextlib.contextmanager
def _child(
    cmd: list[str], env: dict[str, str], logfile: Path | None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session (``dagster dev`` ignores SIGINT without a terminal, and
    spawns the webserver, the daemon and code servers): the whole group is stopped on exit."""
    out: IO[bytes] | None = None
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        out = open(logfile, "ab")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(cmd, cwd=project_root(), env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT if out else None)
        try:
            yield proc
        finally:
            stop_process_group(proc)
    finally:
        if out is not None:
            out.close()


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`_Stop` in the main thread, so children are stopped on the way out."""
    def handler(_sig: int, _frame: Any) -> None:
        raise _Stop

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """Stop ``proc``, its process group and every descendant that left the group: SIGTERM,
    then SIGKILL after ``grace_s`` seconds for whatever is still there."""
    if proc.poll() is not None and not _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # strays of an exited leader
        return
    tree = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(p) for p in tree):
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
