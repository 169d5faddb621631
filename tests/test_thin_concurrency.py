"""``lmat log`` / ``lmat examples`` against ``forget`` and ``vacuum`` (spec sections 7 and 11).

``write_thin`` builds a request file's thin rows from the store (heads, snapshots, the raw log's
tails), writes them and commits them to the thin table; ``forget`` rewrites the thin files that
hold a user's rows; ``vacuum --retention-hours 0`` deletes unreferenced files and expires old log
entries. Each test stops one writer just before its commit to the thin table and runs the other
in a thread until it finishes or waits for the store lock (``tests.test_compact_thin.Interleave``:
a fixed interleaving, not a race). Whatever the order, a forgotten user's rows are gone once the
forget returns, and no row written afterwards carries an event or a head the forget deleted.

Before ``write_thin`` held the store lock from its read to its commit, a log that committed
between a forget's read and its commit kept the user's rows (their pointers and tails built from
the deleted events), the other order failed the log with Delta's ``CommitFailedError``, and a
vacuum in between failed it with ``DeltaError: Invalid table version``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from lmat_platform.protocol.thin import write_thin
from lmat_platform.store import forget_users, ingest_files, open_store, vacuum
from lmat_platform.store.core import delta_dataset, storage_options
from lmat_platform.store.deletion import pending_users
from tests.crash_harness import SCENARIOS, Harness
from tests.test_compact_thin import Interleave, World, build, copy_world, rows

#: The S3 server fixtures (``s3_env``, ``s3_store_uri``).
pytest_plugins = ("tests.s3_server",)

Path_ = Literal["log", "examples"]


def build_with_day3(root: Path, store: str, thin: str) -> World:
    """``tests.test_compact_thin.build`` (days 0-2 ingested and published, 0-1 logged, 2 on the
    batch path), then day 3's events ingested, not published: day 3's requests, not logged yet,
    have tails in the raw log."""
    world = build(root, store, thin)
    ingest_files(store, [str(root / "wl" / "events" / "day-003.parquet")])
    return world


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("thin-concurrency")
    build_with_day3(root, str(root / "store"), str(root / "thin"))
    return root


@pytest.fixture
def world(base: Path, tmp_path: Path) -> World:
    return copy_world(base, tmp_path)


def user_events(store: str, user: int) -> set[int]:
    """Event ids of ``user`` in the raw log (where logged tails come from)."""
    t = delta_dataset(DeltaTable(f"{store}/raw", storage_options=storage_options())).to_table(
        columns=["user_id", "event_id"])
    return set(t.filter(pc.equal(t.column("user_id"), user)).column("event_id").to_pylist())


def a_user_with_tails(world: World) -> int:
    """A user with rows in the thin table, requests in the spare file and (for a log of it)
    tail events in the raw log."""
    logged = set(rows(world.thin).column("user_id").to_pylist())
    for u, _ in Counter(pq.read_table(world.spare).column("user_id").to_pylist()).most_common():
        if u in logged and user_events(world.store, u):
            return int(u)
    raise AssertionError("the workload has no such user")


def of_user(t: pa.Table, user: int, keep: bool = True) -> pa.Table:
    mask = t.column("user_id").to_numpy() == user
    return t.filter(pa.array(mask if keep else ~mask))


def spare_ids(world: World) -> np.ndarray:
    return pq.read_table(world.spare, columns=["request_id"]).column("request_id").to_numpy()


def logged_after_the_forget(world: World, user: int, before: pa.Table, deleted: set[int],
                            got: dict[str, Any], path: Path_) -> None:
    """The thin table after a forget of ``user`` and a log (``path``) of the spare requests,
    whose result is ``got``, that waited for the forget: as the forget left it (its commit, the
    last to the table before it returned) the table holds none of the user's rows, the log
    committed after it, and the user's rows are new requests whose heads and tails hold none
    of the ``deleted`` events (nor does any other row); every other row is there once."""
    ops = {h["version"]: h.get("lmat.op") for h in
           DeltaTable(world.thin, storage_options=storage_options()).history()}
    at_forget = max(v for v, op in ops.items() if op == "forget")
    assert ops[got["version"]] == path and got["version"] > at_forget
    assert of_user(rows(world.thin, version=at_forget), user).num_rows == 0
    after = rows(world.thin)
    assert got["requests"] == len(spare_ids(world))
    mine = of_user(after, user)
    assert mine.num_rows > 0 and set(mine.column("request_id").to_pylist()) <= set(
        spare_ids(world))  # none of the old rows
    assert set(mine.column("head_len").to_pylist()) == {0}
    if path == "log":
        assert set(mine.column("tail_len").to_pylist()) == {0}
        stored = set(pc.list_flatten(mine.column("tail_event_id")).to_pylist())
        assert not stored & deleted
        others = pc.list_flatten(of_user(after, user, keep=False).column("tail_event_id"))
        assert not set(others.to_pylist()) & deleted
    ids = after.column("request_id").to_numpy()
    assert len(ids) == len(np.unique(ids)) == before.num_rows - of_user(
        before, user).num_rows + len(spare_ids(world))


@pytest.mark.parametrize("path", ["log", "examples"])
def test_forget_waits_for_a_log_about_to_commit(world: World, monkeypatch: pytest.MonkeyPatch,
                                                path: Path_) -> None:
    """A forget started while ``lmat log`` (``examples``) has written its files and not yet
    committed them: it waits for the store lock the log holds, then deletes the user's rows,
    the appended ones too (before: the forget ran through and the log's commit then failed on
    Delta's conflict check with an internal ``CommitFailedError``)."""
    before = rows(world.thin)
    user = a_user_with_tails(world)
    ilv = Interleave(monkeypatch, world.thin, lambda: forget_users(world.store, [user]))
    got = write_thin(world.store, world.spare, world.thin, path=path)
    removed = ilv.join()
    after = rows(world.thin)
    assert got["requests"] == len(spare_ids(world))
    assert of_user(after, user).num_rows == 0
    assert removed[f"thin:{world.thin}"] == (of_user(before, user).num_rows
                                             + int((pq.read_table(world.spare).column("user_id")
                                                    .to_numpy() == user).sum()))
    old = np.isin(after.column("request_id").to_numpy(), before.column("request_id").to_numpy())
    assert after.filter(pa.array(old)).select(before.column_names).equals(
        of_user(before, user, keep=False))
    ids = after.column("request_id").to_numpy()
    assert len(ids) == len(np.unique(ids))
    assert set(ids[~old]) == set(spare_ids(world)) - set(
        pq.read_table(world.spare).filter(pc.equal(pc.field("user_id"), user))
        .column("request_id").to_pylist())
    assert len(pending_users(open_store(world.store))) == 0


@pytest.mark.parametrize("path", ["log", "examples"])
def test_log_waits_for_a_forget_about_to_commit(world: World, monkeypatch: pytest.MonkeyPatch,
                                                path: Path_) -> None:
    """``lmat log`` (``examples``) started while a forget is about to commit its rewrite of the
    thin table: it waits for the store lock and builds its rows after the forget returned. The
    user's old rows are gone; the user's requests of the log are new requests of an ordinary
    user again (spec 7; docs/design.md), and their pointers and tails hold nothing the forget
    deleted: an empty head, no tail event (all of the user's events were deleted, none arrived
    since). Before, the log committed in between and its rows of the user outlived the forget
    (there when it returned)."""
    before = rows(world.thin)
    user = a_user_with_tails(world)
    deleted = user_events(world.store, user)
    ilv = Interleave(monkeypatch, world.thin,
                     lambda: write_thin(world.store, world.spare, world.thin, path=path))
    forget_users(world.store, [user])
    got = ilv.join()
    logged_after_the_forget(world, user, before, deleted, got, path)


def test_vacuum_waits_for_a_log_about_to_commit(world: World,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``lmat vacuum --retention-hours 0`` (what ``forget --vacuum`` runs) started while
    ``lmat log`` has written its files: they are unreferenced until the log commits, and the
    vacuum expires the log version the writer read. It waits for the lock; the log's rows are
    all there after it (before: the log failed, ``DeltaError: Invalid table version``)."""
    before = rows(world.thin)
    ilv = Interleave(monkeypatch, world.thin, lambda: vacuum(world.store, retention_hours=0))
    got = write_thin(world.store, world.spare, world.thin, path="log")
    ilv.join()
    after = rows(world.thin)
    assert after.num_rows == before.num_rows + got["requests"]
    assert after.filter(pa.array(np.isin(after.column("request_id").to_numpy(),
                                         before.column("request_id").to_numpy()))
                        ).select(before.column_names).equals(before)
    # (Reading the rows opened every live file: the vacuum deleted none of the log's.)


@pytest.mark.slow
@pytest.mark.parametrize("log_first", [True, False])
def test_log_and_forget_interleaved_on_s3(s3_store_uri: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          log_first: bool) -> None:
    """Both orders again with the store and the thin table on S3 (moto's server on loopback):
    the store's lease keeps ``lmat log`` and ``forget`` apart."""
    monkeypatch.setenv("LMAT_LEASE_SECONDS", "5")
    thin = s3_store_uri.rsplit("/", 1)[0] + "/thin"
    world = build_with_day3(tmp_path, s3_store_uri, thin)
    user = a_user_with_tails(world)
    deleted = user_events(world.store, user)
    before = rows(thin)
    if log_first:
        ilv = Interleave(monkeypatch, thin, lambda: forget_users(world.store, [user]))
        write_thin(world.store, world.spare, thin, path="log")
        ilv.join()
        assert of_user(rows(thin), user).num_rows == 0
    else:
        ilv = Interleave(monkeypatch, thin,
                         lambda: write_thin(world.store, world.spare, thin, path="log"))
        forget_users(world.store, [user])
        logged_after_the_forget(world, user, before, deleted, ilv.join(), "log")
    after = rows(thin)
    assert of_user(after, user, keep=False).num_rows == (
        of_user(before, user, keep=False).num_rows
        + int((pq.read_table(world.spare).column("user_id").to_numpy() != user).sum()))



@pytest.fixture
def ray_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Ray instance of this process (2 CPUs) and its engine; shut down after the test, no
    process of it left."""
    ray = pytest.importorskip("ray")
    from lmat_platform.engines import RayEngine
    from lmat_platform.engines.cluster import stop_leftovers

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    was = ray.is_initialized()
    if not was:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        yield RayEngine(None)
    finally:
        if not was:
            ray.shutdown()
            assert stop_leftovers(tmp) == []
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("log_first", [True, False])
def test_log_with_the_ray_engine_and_forget_interleaved(world: World, ray_engine: Any,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        log_first: bool) -> None:
    """``lmat log --engine ray``: the driver holds the store lock while its tasks build and
    write the buckets' rows and until it commits them, so both orders with a forget end as
    on the local engine (no deadlock: the tasks take no lock)."""
    user = a_user_with_tails(world)
    deleted = user_events(world.store, user)
    before = rows(world.thin)

    def log_it() -> dict[str, Any]:
        return write_thin(world.store, world.spare, world.thin, path="log", engine=ray_engine)

    if log_first:
        ilv = Interleave(monkeypatch, world.thin, lambda: forget_users(world.store, [user]))
        log_it()
        ilv.join()
        assert of_user(rows(world.thin), user).num_rows == 0
    else:
        ilv = Interleave(monkeypatch, world.thin, log_it)
        forget_users(world.store, [user])
        logged_after_the_forget(world, user, before, deleted, ilv.join(), "log")
    assert of_user(rows(world.thin), user, keep=False).num_rows == (
        of_user(before, user, keep=False).num_rows
        + int((pq.read_table(world.spare).column("user_id").to_numpy() != user).sum()))


# ------------------------------------------------------------------------ a killed first write


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("crash"))
    yield h
    h.close()


@pytest.mark.parametrize("name", ["log", "examples"])
def test_first_write_killed_before_it_creates_the_table_is_rerun(harness: Harness,
                                                                  name: str) -> None:
    """``lmat log`` (``examples``) to a new thin table, SIGKILLed after registering the table
    and writing its files, before the commit that creates it: the re-run creates the table
    there (before, it refused: "exists and is not a thin table", and so did every later log to
    that path), and the crash harness's exact check holds. The killed run's files, which no
    commit ever named, go with the next vacuum (before, its "lite" Delta vacuum removed only
    files the log had removed: they stayed, users' rows in them, forgotten ones too)."""
    sc = SCENARIOS[name]
    t = harness.trial(sc, 2, "before")
    assert not t.problems, t.problems
    thin = Path(harness.world.thin("log" if name == "log" else "ex"))
    files = set(thin.rglob("*.parquet"))
    live = {thin / f for f in pa.table(DeltaTable(str(thin)).get_add_actions(flatten=True))
            .column("path").to_pylist()}
    assert live < files  # the killed run's files are left
    vacuum(harness.world.store, retention_hours=0)
    assert set(thin.glob("bucket=*/*.parquet")) == live


def test_a_folder_that_is_not_a_killed_first_write_is_refused(world: World,
                                                              tmp_path: Path) -> None:
    """Only a folder registered with the store and holding nothing but ``bucket=N`` folders of
    Parquet files (and an empty Delta log) is taken for a killed first write; others are
    refused in one line, unchanged."""
    from lmat_platform.exceptions import ThinTableError
    from lmat_platform.store.thin_registry import register_thin_table

    def bucket_folder(root: Path) -> Path:
        (root / "bucket=0").mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), root / "bucket=0" / "part-0.parquet")
        return root

    unregistered = bucket_folder(tmp_path / "unregistered")
    other = bucket_folder(tmp_path / "other")
    (other / "notes.txt").write_text("mine")
    register_thin_table(open_store(world.store), str(other))
    for out in (unregistered, other):
        with pytest.raises(ThinTableError, match="exists and is not a thin table"):
            write_thin(world.store, world.spare, str(out), path="examples")
    assert sorted(p.name for p in other.iterdir()) == ["bucket=0", "notes.txt"]
    registered = bucket_folder(tmp_path / "registered")
    (registered / "_delta_log").mkdir()
    register_thin_table(open_store(world.store), str(registered))
    got = write_thin(world.store, world.spare, str(registered), path="examples")
    assert got["version"] == 0 and rows(str(registered)).num_rows == len(spare_ids(world))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["log", "examples"])
def test_log_forget_and_vacuum_as_processes_at_once(world: World, path: Path_) -> None:
    """``lmat log`` (``examples``), ``lmat forget --user U`` and ``lmat vacuum
    --retention-hours 0`` started together as real processes, in whatever order they reach the
    store lock: all succeed; the log's rows of the user are deleted with the user's others when
    it committed first, else logged after the forget with nothing the forget deleted in them
    (vacuum expires the log entries that would tell the order)."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    before = rows(world.thin)
    user = a_user_with_tails(world)
    deleted = user_events(world.store, user)
    cmds = [[path, world.store, world.spare, "--out", world.thin],
            ["forget", world.store, "--user", str(user)],
            ["vacuum", world.store, "--retention-hours", "0"]]
    procs = [subprocess.Popen([sys.executable, "-m", "lmat_platform.cli", *c], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, (p.args, err)
    assert json.loads(outs[0][0])["requests"] == len(spare_ids(world))
    after = rows(world.thin)
    ids = after.column("request_id").to_numpy()
    assert len(ids) == len(np.unique(ids))
    # Logged after the forget (the user's requests of the file are there, as an ordinary
    # user's) or before it (deleted with the user's others): never an old row of the user, nor
    # a head or a tail event the forget deleted.
    mine = of_user(after, user)
    assert set(mine.column("request_id").to_pylist()) <= set(spare_ids(world))
    assert set(mine.column("head_len").to_pylist()) <= {0}
    if path == "log":
        assert not set(pc.list_flatten(after.column("tail_event_id")).to_pylist()) & deleted
    assert of_user(after, user, keep=False).num_rows == of_user(
        before, user, keep=False).num_rows + int(
        (pq.read_table(world.spare).column("user_id").to_numpy() != user).sum())
