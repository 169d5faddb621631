"""The crash harness: kill a writer at every commit boundary, then check the store exactly.

Every Delta commit lmat makes passes :func:`lmat_platform.store.core.commit_hook`; with
``LMAT_FAULT_KILL_AFTER_COMMIT=N`` (or ``..._BEFORE_...``) the writer SIGKILLs itself right after
(before) its N-th commit. A *scenario* is a small store built by setup steps, one writing command
under test, and what a user does next (re-run the command, ingest more, publish, read). The
harness first runs the command once and counts its commits C, then for every N in 1..C runs the
command again on a fresh copy of the setup, killed at N, then the follow-ups, then checks:

- the accepted set is exact: raw log and tier together hold exactly the events an independent
  model of spec section 2 accepts (nothing lost, nothing twice);
- the quarantine holds exactly the model's rows and reasons;
- every snapshot k holds exactly the accepted events with ``arrival_ts < W_k`` (spec 3);
- ``lmat validate`` passes;
- ``lmat materialize`` of every thin table equals a naive H(u, T) (tests/helpers.py) over the
  model's events.

Commands run through ``lmat_platform.cli.main`` in processes forked from a server that imported
lmat once (multiprocessing's forkserver; it never touches a table, so delta-rs's runtime is
created fresh in each child), which makes a trial cost its Delta work, not an interpreter start.
The kill is a real SIGKILL of that writer process.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.store.core import FAULT_COMMIT_LOG, FAULT_KILL_AFTER, FAULT_KILL_BEFORE
from lmat_platform.tenants import Tenant

REQUIRED = ("user_id", "event_id", "event_ts", "arrival_ts", "item_id", "action")
TENANTS = (
    Tenant(name="all", columns=("event_id", "item_id", "action", "event_ts"), max_len=10_000),
    Tenant(name="short", columns=("event_id", "item_id"), max_len=3, actions=(1, 2)),
)

# ----------------------------------------------------------------------------- the runner


def _child(args: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """A forked writer: ``lmat ARGS`` with the fault switches in ``env``; exits with its code."""
    os.environ.update(env)
    os.environ["LMAT_QUIET"] = "1"
    from lmat_platform.store.core import install_commit_hooks

    install_commit_hooks()
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    from lmat_platform.cli import main

    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Outcome:
    """How a command ended: ``code`` is negative for a signal (-9: SIGKILL)."""

    args: list[str]
    code: int
    stdout: str
    stderr: str
    commits: list[tuple[int, str, str]]

    @property
    def killed(self) -> bool:
        return self.code == -9


class Runner:
    """Runs ``lmat`` commands in processes forked from a server that imported lmat once."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        #: Variables every command runs with (e.g. ``LMAT_ENGINE=ray``).
        self.env = dict(env or {})
        self.ctx = mp.get_context("forkserver")
        # lmat_platform.store loads its modules on use: the writers' modules are named.
        self.ctx.set_forkserver_preload(["lmat_platform.cli", "lmat_platform.store.ingest",
                                         "lmat_platform.store.snapshots",
                                         "lmat_platform.store.heads",
                                         "lmat_platform.store.deletion",
                                         "lmat_platform.protocol", "lmat_platform.reconstruct",
                                         "tests.crash_harness"])
        self.tmp = tempfile.mkdtemp(prefix="lmat-crash-run-")

    def run(self, args: Sequence[str], *, kill_after: int | None = None,
            kill_before: int | None = None, timeout: float = 120) -> Outcome:
        log = os.path.join(self.tmp, "commits.log")
        out, err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        with contextlib.suppress(FileNotFoundError):
            os.remove(log)
        env = {**self.env, FAULT_COMMIT_LOG: log}
        if kill_after is not None:
            env[FAULT_KILL_AFTER] = str(kill_after)
        if kill_before is not None:
            env[FAULT_KILL_BEFORE] = str(kill_before)
        p = self.ctx.Process(target=_child, args=(list(args), env, out, err))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise TimeoutError(f"lmat {' '.join(args)} ran over {timeout}s")
        commits = []
        if os.path.exists(log):
            with open(log) as f:
                for line in f:
                    n, kind, table = line.rstrip("\n").split("\t")
                    commits.append((int(n), kind, table))
        with open(out) as fo, open(err) as fe:
            stdout, stderr = fo.read(), fe.read()
        assert p.exitcode is not None
        return Outcome(list(args), p.exitcode, stdout, stderr, commits)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the model


@dataclass
class Model:
    """Spec sections 2, 3 and 7 in plain Python: what the store must hold after a history."""

    accepted: dict[int, dict[str, Any]] = field(default_factory=dict)
    quarantine: list[tuple[int | None, str, int | None]] = field(default_factory=list)
    watermarks: list[int] = field(default_factory=list)
    fence: int | None = None
    forgotten: set[int] = field(default_factory=set)
    thin: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def ingest(self, rows: Sequence[Mapping[str, Any]]) -> None:
        seen: set[int] = set()
        for r in rows:
            if any(r.get(c) is None for c in REQUIRED):
                self.quarantine.append((r.get("event_id"), "null_required_column", r.get("user_id")))
            elif r["event_ts"] > r["arrival_ts"]:
                self.quarantine.append((r["event_id"], "event_ts_after_arrival_ts", r["user_id"]))
            elif self.fence is not None and r["arrival_ts"] < self.fence:
                self.quarantine.append((r["event_id"], "behind_watermark", r["user_id"]))
            elif r["event_id"] in seen or r["event_id"] in self.accepted:
                continue  # a duplicate
            else:
                seen.add(r["event_id"])
                self.accepted[r["event_id"]] = dict(r)

    def publish_started(self, watermark: int) -> None:
        self.fence = max(self.fence or watermark, watermark)

    def publish(self, watermark: int) -> None:
        self.watermarks.append(watermark)
        self.publish_started(watermark)

    def forget(self, users: Sequence[int]) -> None:
        self.forgotten |= set(users)
        self.accepted = {k: v for k, v in self.accepted.items() if v["user_id"] not in users}
        self.quarantine = [q for q in self.quarantine if q[2] not in users]
        # Their requests logged so far leave every thin table (later ones are new examples).
        self.thin = {k: [r for r in v if r["user_id"] not in users] for k, v in self.thin.items()}


# ----------------------------------------------------------------------------- the world


@dataclass
class World:
    """A scenario's files: the store, thin tables, event and request files."""

    root: Path

    @property
    def store(self) -> str:
        return str(self.root / "store")

    def thin(self, name: str) -> str:
        return str(self.root / "thin" / name)

    def file(self, name: str) -> str:
        return str(self.root / "in" / f"{name}.parquet")


def _events(rng: np.random.Generator, first_id: int, n: int, lo: int, hi: int, *,
            dirty: bool = True, trait: str | None = None, dup_of: int | None = None
            ) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        arr = int(rng.integers(lo, hi))
        rows.append({
            "user_id": int(rng.integers(1, 7)),
            "event_id": first_id + i,
            "event_ts": arr - int(rng.integers(0, 400)),
            "arrival_ts": arr,
            "item_id": int(rng.integers(0, 50)),
            "action": int(rng.integers(1, 4)),
        })
        if trait:
            rows[-1][trait] = int(rng.integers(0, 5))
    if dirty:
        rows[3]["item_id"] = None  # null required column
        rows[5]["event_ts"] = rows[5]["arrival_ts"] + 1  # event after arrival
        rows.append(dict(rows[7]))  # a duplicate inside the file (the first wins)
    if dup_of is not None:
        rows.append({**rows[0], "event_id": dup_of})  # an id accepted by an earlier file
    return rows


def _write_events(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    types = {"user_id": pa.int64(), "event_id": pa.int64(), "event_ts": pa.int64(),
             "arrival_ts": pa.int64(), "item_id": pa.int64(), "action": pa.int16()}
    extra = sorted({k for r in rows for k in r} - set(types))
    cols = {c: pa.array([r.get(c) for r in rows], t) for c, t in types.items()}
    for c in extra:
        cols[c] = pa.array([r.get(c) for r in rows], pa.int16())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path)


def _write_requests(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({
        "request_id": pa.array([r["request_id"] for r in rows], pa.int64()),
        "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
        "request_ts": pa.array([r["request_ts"] for r in rows], pa.int64()),
        "label": pa.array([r["request_id"] % 2 for r in rows], pa.int8()),
    }), path)


def build_inputs(world: World) -> dict[str, list[dict[str, Any]]]:
    """The scenario files. Arrivals: e1 0-1000, e2 800-2000 (rows behind W=1000 if published),
    e3 1500-3000 with a new trait, late 2000-3200 (rows in [2000, 3000) are late for a
    publish at 3000), extra 5000-6000; requests at 2000-4500 (after everything but extra)."""
    rng = np.random.default_rng(7)
    ev = {
        "e1": _events(rng, 0, 40, 0, 1000),
        "e2": _events(rng, 100, 40, 800, 2000, dup_of=3),
        "e3": _events(rng, 200, 40, 1500, 3000, trait="surface", dup_of=105),
        "late": _events(rng, 300, 12, 2000, 3200, dirty=False),
        "extra": _events(rng, 400, 20, 5000, 6000),
    }
    for name, rows in ev.items():
        _write_events(world.file(name), rows)
    req = [{"request_id": i, "user_id": int(rng.integers(1, 7)),
            "request_ts": int(rng.integers(2000, 4500))} for i in range(30)]
    _write_requests(world.file("req"), req)
    _write_requests(world.file("req2"), [{**r, "request_id": r["request_id"] + 1000}
                                         for r in req[:15]])
    return {**ev, "req": req, "req2": [{**r, "request_id": r["request_id"] + 1000}
                                       for r in req[:15]]}


# ----------------------------------------------------------------------------- steps

Step = tuple[Any, ...]


def step_args(world: World, step: Step) -> list[str]:
    kind = step[0]
    s = world.store
    if kind == "ingest":
        return ["ingest", s, *[world.file(f) for f in step[1]]]
    if kind == "snapshot":
        return ["snapshot", s, "--watermark", str(step[1]), "--published-at", str(step[2])]
    if kind in ("log", "examples"):
        return [kind, s, world.file(step[1]), "--out", world.thin(step[2])]
    if kind == "forget":
        return ["forget", s, "--user", *map(str, step[1])]
    if kind == "compact":  # ("compact",) or ("compact", (thin table names,))
        return ["compact", s, *[a for n in (step[1] if len(step) > 1 else ())
                                for a in ("--thin", world.thin(n))]]
    if kind == "vacuum":
        return ["vacuum", s, "--retention-hours", "0"]
    raise ValueError(kind)


def apply_step(model: Model, inputs: Mapping[str, Any], step: Step) -> None:
    kind = step[0]
    if kind == "ingest":
        for f in step[1]:
            model.ingest(inputs[f])
    elif kind == "snapshot":
        model.publish(step[1])
    elif kind in ("log", "examples"):
        model.thin.setdefault(step[2], []).extend(inputs[step[1]])
    elif kind == "forget":
        model.forget(step[1])


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: tuple[Step, ...]
    command: Step
    #: What the user does next; ``"rerun"`` is the command under test again.
    after: tuple[Step | str, ...] = ("rerun",)


_BASE = (("ingest", ("e1", "e2", "e3")), ("snapshot", 1000, 1100), ("snapshot", 2000, 2100))
SCENARIOS = {
    s.name: s
    for s in (
        Scenario("ingest", (("ingest", ("e1",)), ("snapshot", 1000, 1100)),
                 ("ingest", ("e2", "e3")),
                 ("rerun", ("ingest", ("extra",)), ("snapshot", 3000, 3100))),
        # A publish runs before the killed ingest is re-run: files whose accepted rows landed
        # were decided before it, the rest are fenced at its watermark.
        Scenario("ingest-publish", (("ingest", ("e1",)), ("snapshot", 1000, 1100)),
                 ("ingest", ("e2", "e3")),
                 (("snapshot", 2000, 2100), "rerun", ("ingest", ("extra",)))),
        Scenario("snapshot", _BASE, ("snapshot", 3000, 3100),
                 (("ingest", ("late",)), "rerun", ("ingest", ("extra",)))),
        Scenario("log", _BASE, ("log", "req", "log"),
                 ("rerun", ("log", "req2", "log"))),
        Scenario("examples", _BASE, ("examples", "req", "ex"),
                 ("rerun", ("examples", "req2", "ex"))),
        Scenario("forget", (*_BASE, ("log", "req", "log"), ("examples", "req", "ex")),
                 ("forget", (2, 3)), ("rerun", ("ingest", ("extra",)))),
        Scenario("compact", (*_BASE, ("snapshot", 3000, 3100)), ("compact",),
                 ("rerun", ("ingest", ("extra",)))),
        # The tier's compaction, then the thin table's merge (two files a bucket); a forget
        # after it must find the user's rows in whichever files the kill left live.
        Scenario("compact-thin", (*_BASE, ("snapshot", 3000, 3100), ("log", "req", "log"),
                                  ("log", "req2", "log")), ("compact", ("log",)),
                 ("rerun", ("forget", (2,)))),
        Scenario("vacuum", (*_BASE, ("log", "req", "log"), ("forget", (4,))), ("vacuum",),
                 ("rerun", ("ingest", ("extra",)))),
    )
}


# ----------------------------------------------------------------------------- checks


def _read(store: Any, name: str) -> pa.Table | None:
    return store.read_table(name)


def check_store(world: World, model: Model) -> list[str]:
    """Every problem found (empty: the store is exactly what the model says)."""
    from lmat_platform.cli import main
    from lmat_platform.reconstruct import materialize
    from lmat_platform.store import list_snapshots, open_store
    from tests.helpers import expected_outputs

    problems: list[str] = []
    store = open_store(world.store)
    raw, tier, quar = (_read(store, n) for n in ("raw", "uih", "quarantine"))
    raw_ids = raw.column("event_id").to_pylist() if raw is not None else []
    tier_ids = tier.column("event_id").to_pylist() if tier is not None else []
    for name, ids in (("raw log", raw_ids), ("tier", tier_ids)):
        twice = [i for i, n in Counter(ids).items() if n > 1]
        if twice:
            problems.append(f"{name} holds event ids twice: {sorted(twice)[:5]}")
    rows: dict[int, dict[str, Any]] = {}
    for t in (raw, tier):
        if t is not None:
            for r in t.select(list(REQUIRED)).to_pylist():
                rows[r["event_id"]] = r
    want = {k: {c: v[c] for c in REQUIRED} for k, v in model.accepted.items()}
    if rows != want:
        lost = sorted(set(want) - set(rows))
        extra = sorted(set(rows) - set(want))
        diff = sorted(k for k in set(want) & set(rows) if want[k] != rows[k])
        problems.append(f"accepted set: lost {lost[:5]}, unexpected {extra[:5]}, "
                        f"changed {diff[:5]}")
    got_q = Counter((r["event_id"], r["reason"]) for r in quar.select(
        ["event_id", "reason"]).to_pylist()) if quar is not None else Counter()
    want_q = Counter((q[0], q[1]) for q in model.quarantine)
    if got_q != want_q:
        problems.append(f"quarantine: missing {list((want_q - got_q).items())[:5]}, "
                        f"unexpected {list((got_q - want_q).items())[:5]}")
    snaps = list_snapshots(store)
    if [s.watermark for s in snaps] != model.watermarks:
        problems.append(f"snapshots: watermarks {[s.watermark for s in snaps]}, "
                        f"want {model.watermarks}")
    tier_rows = tier.select(["event_id", "snapshot_id"]).to_pylist() if tier is not None else []
    for s in snaps:
        held = {r["event_id"] for r in tier_rows if r["snapshot_id"] <= s.snapshot_id}
        below = {k for k, v in model.accepted.items() if v["arrival_ts"] < s.watermark}
        if held != below:
            problems.append(f"snapshot {s.snapshot_id} (W={s.watermark}): missing "
                            f"{sorted(below - held)[:5]}, unexpected {sorted(held - below)[:5]}")
    from lmat_platform.store.thin_registry import registered_thin_tables

    unregistered = {world.thin(n) for n in model.thin} - set(registered_thin_tables(store))
    if unregistered:
        problems.append(f"thin tables forget would not find: {sorted(unregistered)}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = main(["validate", world.store])
    if code != 0:
        problems.append(f"lmat validate exited {code}")
    problems += check_thin_rows(world, model)
    events = list(model.accepted.values())
    # A read a user would do next: batch-path examples of the requests, written now.
    from lmat_platform.protocol import write_thin

    fresh = "check-examples"
    shutil.rmtree(world.thin(fresh), ignore_errors=True)
    try:
        write_thin(store, world.file("req"), world.thin(fresh), path="examples")
        thin = {**model.thin, fresh: list(_requests_of(world))}
    except Exception as e:  # noqa: BLE001 - reported as a problem of the trial
        problems.append(f"examples after the trial: {type(e).__name__}: {e}")
        thin = dict(model.thin)
    for name, reqs in sorted(thin.items()):
        for tenant in TENANTS:
            out = str(world.root / f"mat-{name}-{tenant.name}.parquet")
            try:
                materialize(store, world.thin(name), tenant, out)
            except Exception as e:  # noqa: BLE001 - reported as a problem of the trial
                problems.append(f"materialize {name}/{tenant.name}: {type(e).__name__}: {e}")
                continue
            got = {r["request_id"]: r for r in pq.read_table(out).to_pylist()}
            exp = expected_outputs(events, reqs, tenant)
            for rid, w in exp.items():
                if rid not in got:
                    # A forgotten user's examples may be removed with the user (spec 7).
                    if w["user_id"] not in model.forgotten:
                        problems.append(f"materialize {name}: request {rid} missing")
                    continue
                g = got[rid]
                bad = [c for c in w if g.get(c) != w[c]]
                if bad:
                    problems.append(f"materialize {name}/{tenant.name}: request {rid} differs "
                                    f"from naive H(u,T) in {bad}")
                    break
            unexpected = set(got) - set(exp)
            if unexpected:
                problems.append(f"materialize {name}: unexpected requests {sorted(unexpected)[:5]}")
    return problems


def check_thin_rows(world: World, model: Model) -> list[str]:
    """Each thin table holds exactly the requests logged to it and not forgotten since, each
    once."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from lmat_platform.store.core import delta_dataset

    problems = []
    for name, reqs in sorted(model.thin.items()):
        try:
            t = delta_dataset(DeltaTable(world.thin(name))).to_table(columns=["request_id"])
        except TableNotFoundError as e:
            problems.append(f"thin table {name}: {str(e).splitlines()[0]}")
            continue
        got = Counter(t.column("request_id").to_pylist())
        twice = sorted(r for r, n in got.items() if n > 1)
        want = {r["request_id"] for r in reqs}
        if twice or set(got) != want:
            problems.append(f"thin table {name}: twice {twice[:5]}, missing "
                            f"{sorted(want - set(got))[:5]}, unexpected "
                            f"{sorted(set(got) - want)[:5]}")
    return problems


def _requests_of(world: World) -> list[dict[str, Any]]:
    return pq.read_table(world.file("req"), columns=["request_id", "user_id",
                                                     "request_ts"]).to_pylist()


# ----------------------------------------------------------------------------- trials


@dataclass
class Trial:
    scenario: str
    mode: str  # "after" or "before"
    n: int
    problems: list[str]
    seconds: float


@dataclass
class Sweep:
    trials: list[Trial] = field(default_factory=list)
    commits: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> list[Trial]:
        return [t for t in self.trials if t.problems]

    def summary(self) -> str:
        kill_points = sum(self.commits.values())
        return (f"crash sweep: {len(self.commits)} commands x {kill_points} kill points "
                f"({', '.join(f'{k} {v}' for k, v in self.commits.items())}) -> "
                f"{len(self.trials)} trials, {len(self.failures)} failures")


class Harness:
    """Builds each scenario's setup once and runs trials on fresh copies of it."""

    def __init__(self, root: Path, runner: Runner | None = None) -> None:
        self.root = root
        self.runner = runner or Runner()
        self.world = World(root / "w")
        self._setups: dict[str, tuple[Path, Model]] = {}
        self.inputs: dict[str, Any] = {}

    def _run_ok(self, args: Sequence[str]) -> Outcome:
        out = self.runner.run(args)
        if out.code != 0:
            raise AssertionError(f"lmat {' '.join(args)} exited {out.code}: {out.stderr}")
        return out

    def setup(self, sc: Scenario) -> Model:
        """A fresh copy of the scenario's setup at the world's path, and its model."""
        if sc.name not in self._setups:
            shutil.rmtree(self.world.root, ignore_errors=True)
            self.inputs = build_inputs(self.world)
            model = Model()
            self._run_ok(["init", self.world.store, "--buckets", "2", "--row-group-rows", "64"])
            for step in sc.setup:
                self._run_ok(step_args(self.world, step))
                apply_step(model, self.inputs, step)
            saved = self.root / f"setup-{sc.name}"
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(self.world.root, saved)
            self._setups[sc.name] = (saved, model)
        saved, model = self._setups[sc.name]
        shutil.rmtree(self.world.root, ignore_errors=True)
        shutil.copytree(saved, self.world.root)
        return _copy_model(model)

    def count_commits(self, sc: Scenario) -> int:
        """The commits the command makes on the scenario's setup; also checks that every Delta
        table it changed went through the commit hook (so no commit escapes the sweep)."""
        self.setup(sc)
        before = delta_versions(self.world.root)
        out = self._run_ok(step_args(self.world, sc.command))
        after = delta_versions(self.world.root)
        changed = {t for t, v in after.items() if before.get(t) != v}
        hooked = {os.path.abspath(t.removeprefix("file://")) for _, _, t in out.commits}
        missed = changed - hooked
        if missed:
            raise AssertionError(f"{sc.name}: commits to {sorted(missed)} bypassed the hook")
        return len(out.commits)

    def trial(self, sc: Scenario, n: int, mode: str = "after") -> Trial:
        t0 = time.perf_counter()
        model = self.setup(sc)
        args = step_args(self.world, sc.command)
        kw = {"kill_after": n} if mode == "after" else {"kill_before": n}
        first = self.runner.run(args, **kw)
        problems: list[str] = []
        if not first.killed:
            problems.append(f"not killed at {mode} commit {n}: exit {first.code} {first.stderr}")
        landed = len(first.commits)
        if sc.command[0] == "snapshot" and landed >= 1:
            # The publish's intent landed: ingest now fences at its watermark (spec 3).
            model.publish_started(sc.command[1])
        rerun: Step = sc.command
        if sc.command[0] == "ingest" and sc.after and sc.after[0] != "rerun":
            # Files whose accepted rows landed were decided by the killed run.
            k = sum(1 for _, _, t in first.commits if t.rstrip("/").endswith("/raw"))
            apply_step(model, self.inputs, ("ingest", sc.command[1][:k]))
            rerun = ("ingest", sc.command[1][k:])
        for step in sc.after:
            s = sc.command if step == "rerun" else step
            assert not isinstance(s, str)
            out = self.runner.run(step_args(self.world, s))
            if out.code != 0 and not (step == "rerun" and _done_already(out)):
                problems.append(f"{' '.join(out.args[:1])} after the kill exited {out.code}: "
                                f"{out.stderr.strip()}")
            apply_step(model, self.inputs, rerun if step == "rerun" else s)
        problems += check_store(self.world, model)
        return Trial(sc.name, mode, n, problems, time.perf_counter() - t0)

    def sweep(self, names: Sequence[str], *, modes: Sequence[str] = ("after",),
              progress: Callable[[Trial], None] | None = None) -> Sweep:
        out = Sweep()
        for name in names:
            sc = SCENARIOS[name]
            c = self.count_commits(sc)
            out.commits[name] = c
            for mode in modes:
                for n in range(1, c + 1):
                    t = self.trial(sc, n, mode)
                    out.trials.append(t)
                    if progress:
                        progress(t)
        return out

    def close(self) -> None:
        self.runner.close()


def _done_already(out: Outcome) -> bool:
    """A re-run refused because the killed run had landed its commit point (a thin table
    holds the requests; the snapshot is registered): what a user reads as "done"."""
    return out.code == 2 and (
        (out.args[0] in ("log", "examples") and "is already in" in out.stderr)
        or (out.args[0] == "snapshot" and "does not increase" in out.stderr)
    )


def delta_versions(root: Path) -> dict[str, int]:
    """Latest commit version of every Delta table under ``root``, by table path."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        if os.path.basename(dirpath) == "_delta_log":
            vs = [int(f[:20]) for f in files if f.endswith(".json") and f[:20].isdigit()]
            if vs:
                out[os.path.abspath(os.path.dirname(dirpath))] = max(vs)
            dirnames.clear()
    return out


def _copy_model(m: Model) -> Model:
    return Model(dict(m.accepted), list(m.quarantine), list(m.watermarks), m.fence,
                 set(m.forgotten), {k: list(v) for k, v in m.thin.items()})


def write_summary(sweep: Sweep, path: str | os.PathLike[str]) -> None:
    """The sweep's numbers as JSON (commands, kill points, trials, failures and their problems)."""
    Path(path).write_text(json.dumps({
        "summary": sweep.summary(),
        "commits": sweep.commits,
        "trials": len(sweep.trials),
        "failures": [{"scenario": t.scenario, "mode": t.mode, "n": t.n,
                      "problems": t.problems[:5]} for t in sweep.failures],
        "seconds": round(sum(t.seconds for t in sweep.trials), 1),
    }, indent=2))
