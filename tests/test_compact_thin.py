"""``compact_thin`` / ``lmat compact --thin`` against concurrent writers and kills (spec 7, 11).

The merge reads a thin table, writes one file a bucket and commits; ``forget`` reads the same
files, rewrites those holding a user's rows and commits; ``lmat log`` appends. Each test here
stops one of them just before its commit (the first ``create_write_transaction`` it makes on
the thin table, in the test's main thread), runs the other in a thread, and lets the first go
on once the other has finished or is waiting for the store lock the first holds: a fixed
interleaving, not a race. Then every row must be there exactly once, and none of a forgotten
user's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from lmat_platform import synth
from lmat_platform.exceptions import ConcurrencyError
from lmat_platform.protocol.thin import COMPACT_ATTEMPTS, compact_thin, write_thin
from lmat_platform.store import (
    forget_users,
    ingest_files,
    init_store,
    publish_snapshot,
    vacuum,
)
from lmat_platform.store.core import Store, delta_dataset, storage_options
from tests.crash_harness import SCENARIOS, Harness, Trial
from tests.helpers import REPO, one_line_error, run_main, tree

#: The S3 server fixtures (``s3_env``, ``s3_store_uri``).
pytest_plugins = ("tests.s3_server",)

CFG = synth.WorkloadConfig(seed=3, n_users=16, days=4, events_per_day=300, requests_per_day=40)


@dataclass(frozen=True)
class World:
    store: str
    thin: str
    #: Day 3's requests, not logged yet: a concurrent append.
    spare: str


def build(root: Path, store: str, thin: str) -> World:
    """Days 0-2 ingested and published; days 0 and 1 logged (streaming path), day 2 on the
    batch path: the thin table has up to three files a bucket."""
    wl = synth.write_workload(CFG, root / "wl")
    st = init_store(store, n_buckets=2)
    for d in range(3):
        ingest_files(st, [str(wl.event_files[d])])
        write_thin(st, str(wl.request_files[d]), thin, path="log" if d < 2 else "examples")
        publish_snapshot(st, synth.day_bounds(CFG, d)[1])
    return World(store, thin, str(wl.request_files[3]))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compact-thin")
    build(root, str(root / "store"), str(root / "thin"))
    return root


@pytest.fixture
def world(base: Path, tmp_path: Path) -> World:
    return copy_world(base, tmp_path)


def copy_world(base: Path, tmp_path: Path) -> World:
    """A fresh copy of the store and thin table :func:`build` made under ``base``, the copy's
    thin table registered with the copy's store (in place of the original, which ``forget``
    must not touch)."""
    root = tmp_path / "w"
    shutil.copytree(base, root)
    store, thin = str(root / "store"), str(root / "thin")
    reg = str(root / "store" / "thin_tables")
    write_deltalake(reg, pa.table({"uri": [thin], "registered_at": pa.array([0], pa.int64())}),
                    mode="overwrite")
    return World(store, thin, str(root / "wl" / "requests" / "day-003.parquet"))


def rows(thin: str, *, version: int | None = None) -> pa.Table:
    dt = DeltaTable(thin, version=version, storage_options=storage_options())
    return delta_dataset(dt).to_table().sort_by("request_id")


def live_files(thin: str) -> Counter[int]:
    """Live files of the thin table, by bucket."""
    acts = pa.table(DeltaTable(thin, storage_options=storage_options())
                    .get_add_actions(flatten=True))
    return Counter(int(b) for b in acts.column("partition.bucket").to_pylist())


def a_user_in_a_merged_bucket(thin: str) -> int:
    """A user with rows in a bucket of several files (one the merge rewrites)."""
    t = rows(thin)
    many = {b for b, n in live_files(thin).items() if n >= 2}
    users = [u for u, b in zip(t.column("user_id").to_pylist(), t.column("bucket").to_pylist(),
                               strict=True) if b in many]
    return Counter(users).most_common(1)[0][0]


def without(t: pa.Table, user: int) -> pa.Table:
    return t.filter(pa.array(t.column("user_id").to_numpy() != user))


def _same_table(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        return u.removeprefix("file://").rstrip("/")

    return norm(a) == norm(b)


class Interleave:
    """Run ``other`` in a thread when the main thread is about to commit to ``table`` (its
    first ``create_write_transaction`` on it), and let the main thread's commit go on once
    ``other`` has finished, or is waiting for the store's write lock that the main thread
    holds (``Store.write_lock`` is watched to tell)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, table: str,
                 other: Callable[[], Any]) -> None:
        self.table = table
        self.other = other
        self.main = threading.get_ident()
        self.fired = False
        self.holder: int | None = None
        self.other_waits = threading.Event()
        self.thread: threading.Thread | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        orig_commit = DeltaTable.create_write_transaction
        orig_lock = Store.write_lock
        me = self

        def commit(dt: DeltaTable, *a: Any, **kw: Any) -> Any:
            if (not me.fired and threading.get_ident() == me.main
                    and _same_table(dt.table_uri, me.table)):
                me.fired = True
                me._run_other()
            return orig_commit(dt, *a, **kw)

        @contextlib.contextmanager
        def lock(store: Store, **kw: Any) -> Iterator[None]:
            if me.thread is not None and threading.get_ident() == me.thread.ident:
                me.other_waits.set()
            with orig_lock(store, **kw):
                me.holder = threading.get_ident()
                try:
                    yield
                finally:
                    me.holder = None

        monkeypatch.setattr(DeltaTable, "create_write_transaction", commit)
        monkeypatch.setattr(Store, "write_lock", lock)

    def _run_other(self) -> None:
        def run() -> None:
            try:
                self.result = self.other()
            except BaseException as e:  # noqa: BLE001 - re-raised by join()
                self.error = e

        self.thread = threading.Thread(target=run, name="interleaved")
        self.thread.start()
        deadline = time.monotonic() + 120
        while self.thread.is_alive():
            if self.other_waits.is_set() and self.holder == self.main:
                return  # it waits for the lock this thread holds until after its commit
            if time.monotonic() > deadline:
                raise AssertionError("the interleaved writer neither finished nor waited")
            time.sleep(0.01)

    def join(self) -> Any:
        assert self.fired and self.thread is not None, "the main writer never committed"
        self.thread.join(120)
        if self.error is not None:
            raise self.error
        return self.result


# ------------------------------------------------------------------------ forget x merge


def _check_forgotten(world: World, before: pa.Table, user: int, removed: dict[str, int]) -> None:
    assert removed[f"thin:{world.thin}"] == int(
        (before.column("user_id").to_numpy() == user).sum()) > 0
    after = rows(world.thin)
    assert user not in set(after.column("user_id").to_pylist())
    assert after.equals(without(before, user))  # every other row, once, unchanged
    assert set(live_files(world.thin).values()) == {1}  # merged


def test_forget_waits_for_a_merge_about_to_commit(world: World,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A forget started after the merge read the files: it must not commit in between (the
    merge would carry the user's rows back, or fail on Delta's conflict check, which it did
    before the merge took the store lock: ``CommitFailedError``); it rewrites the merged file
    after."""
    before = rows(world.thin)
    user = a_user_in_a_merged_bucket(world.thin)
    ilv = Interleave(monkeypatch, world.thin, lambda: forget_users(world.store, [user]))
    out = compact_thin(world.store, world.thin)
    assert out["files_out"] == 2 and out["files_in"] > 2
    _check_forgotten(world, before, user, ilv.join())


def test_merge_waits_for_a_forget_about_to_commit(world: World,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge started while a forget is about to commit its rewrite of the thin files: the
    merge reads the table after it (before the fix it read the files with the user's rows,
    committed first, and the forget failed on the conflict, leaving the user pending)."""
    before = rows(world.thin)
    user = a_user_in_a_merged_bucket(world.thin)
    ilv = Interleave(monkeypatch, world.thin, lambda: compact_thin(world.store, world.thin))
    removed = forget_users(world.store, [user])
    assert ilv.join()["files_out"] == 2
    _check_forgotten(world, before, user, removed)
    from lmat_platform.store import open_store
    from lmat_platform.store.deletion import pending_users

    assert len(pending_users(open_store(world.store))) == 0


def test_vacuum_waits_for_a_merge_about_to_commit(world: World,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``lmat vacuum --retention-hours 0`` (what ``forget --vacuum`` runs) started after the
    merge wrote its files: they are not referenced until the merge commits, so a vacuum in
    between would delete them (before the fix the merge then failed: the vacuum had also expired
    the log version it read). It waits for the lock, then removes the merged-away files; every
    row reads back."""
    before = rows(world.thin)
    ilv = Interleave(monkeypatch, world.thin,
                     lambda: vacuum(world.store, retention_hours=0))
    out = compact_thin(world.store, world.thin)
    assert ilv.join()[world.thin] == out["files_in"]  # the merged-away files, after the commit
    assert rows(world.thin).equals(before)
    assert set(live_files(world.thin).values()) == {1} and out["files_out"] == 2


def test_log_while_a_forget_is_about_to_commit(world: World,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Spec 7: a forgotten user's thin rows are gone when ``forget`` returns. A ``lmat log``
    of the user's requests started between the forget's read of the thin table and its commit
    waits for the store lock (before, it committed in between and the user's rows outlived the
    forget); it logs them after the forget as an ordinary user's requests, whose history the
    forget deleted: empty heads and tails. (More orders and writers:
    ``tests/test_thin_concurrency.py``.)"""
    logged = set(rows(world.thin).column("user_id").to_pylist())
    user = next(u for u, _ in Counter(pq.read_table(world.spare).column("user_id")
                                      .to_pylist()).most_common() if u in logged)
    old = rows(world.thin).column("request_id").to_numpy()
    ilv = Interleave(monkeypatch, world.thin,
                     lambda: write_thin(world.store, world.spare, world.thin, path="log"))
    forget_users(world.store, [user])
    got = ilv.join()
    assert user not in set(rows(world.thin, version=got["version"] - 1)
                           .column("user_id").to_pylist())
    after = rows(world.thin)
    mine = after.filter(pa.array(after.column("user_id").to_numpy() == user))
    assert mine.num_rows and not np.isin(mine.column("request_id").to_numpy(), old).any()
    assert set(mine.column("head_len").to_pylist()) == set(mine.column("tail_len")
                                                           .to_pylist()) == {0}


# ------------------------------------------------------------------------ append x merge


def _with_new_column(src: str, dest: Path) -> str:
    t = pq.read_table(src)
    pq.write_table(t.append_column("slot", pa.array(np.arange(t.num_rows) % 3, pa.int16())),
                   dest)
    return str(dest)


@pytest.mark.parametrize("new_column", [False, True])
def test_append_while_a_merge_is_about_to_commit(world: World, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 new_column: bool) -> None:
    """``lmat log`` started between the merge's read and commit waits for the store lock the
    merge holds and appends after it: its files are live beside the merged ones, also when it
    adds a column. (Before ``log`` took the lock it committed in between; an append that added
    a column changed the table's metadata, which Delta's conflict check refused the merge for,
    and the merge read again; the retry is tested below.)"""
    before = rows(world.thin)
    n_files = sum(live_files(world.thin).values())
    spare = _with_new_column(world.spare, tmp_path / "r.parquet") if new_column else world.spare
    ilv = Interleave(monkeypatch, world.thin,
                     lambda: write_thin(world.store, spare, world.thin, path="log"))
    out = compact_thin(world.store, world.thin)
    appended = ilv.join()["requests"]
    after = rows(world.thin)
    new = after.filter(pa.array(~np.isin(after.column("request_id").to_numpy(),
                                         before.column("request_id").to_numpy())))
    appended_buckets = sorted(set(new.column("bucket").to_pylist()))
    ids = after.column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) == before.num_rows + appended
    assert after.select(before.column_names).filter(
        pa.array(np.isin(ids, before.column("request_id").to_numpy()))).equals(before)
    assert ("slot" in after.column_names) == new_column
    # The merged file and the appended one in each bucket.
    assert out["files_in"] == n_files
    assert live_files(world.thin) == Counter(dict.fromkeys(range(2), 1)) + Counter(
        appended_buckets)


def test_merge_while_an_append_is_about_to_commit(world: World,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: a merge started while ``lmat log`` has written its files and not
    committed them waits for the lock, then merges the appended files too; nothing lost or
    doubled."""
    before = rows(world.thin)
    ilv = Interleave(monkeypatch, world.thin, lambda: compact_thin(world.store, world.thin))
    got = write_thin(world.store, world.spare, world.thin, path="log")
    assert ilv.join()["files_out"] == 2
    ids = rows(world.thin).column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) == before.num_rows + got["requests"]
    assert set(live_files(world.thin).values()) == {1}


def test_merge_gives_up_in_one_line_after_conflicts(world: World,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit refused by Delta's conflict check every time: after COMPACT_ATTEMPTS reads,
    a one-line ConcurrencyError, and the table as it was (its files and rows)."""
    before, files = rows(world.thin), live_files(world.thin)
    orig = DeltaTable.create_write_transaction
    n = [0]

    def conflicting(dt: DeltaTable, *a: Any, **kw: Any) -> Any:
        if _same_table(dt.table_uri, world.thin):  # a column added by another writer first
            from deltalake.schema import Field

            n[0] += 1
            DeltaTable(world.thin).alter.add_columns([Field(f"c{n[0]}", "long", nullable=True)])
        return orig(dt, *a, **kw)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", conflicting)
    with pytest.raises(ConcurrencyError) as e:
        compact_thin(world.store, world.thin)
    assert n[0] == COMPACT_ATTEMPTS
    assert "re-run" in str(e.value) and "\n" not in str(e.value)
    assert live_files(world.thin) == files
    assert rows(world.thin).select(before.column_names).equals(before)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["forget", "log"])
def test_two_merges_and_a_writer_as_processes_at_once(world: World, other: str) -> None:
    """Two ``lmat compact --thin`` and a ``lmat forget`` (or ``lmat log``) started together as
    real processes, in whatever order they reach the fcntl lock: the user is gone (the
    appended rows are there), every other row is there once, and a last merge leaves one file
    a bucket. (A log racing a forget is not this test's subject.)"""
    import subprocess

    before = rows(world.thin)
    user = Counter(before.column("user_id").to_pylist()).most_common(1)[0][0]
    merge = ["compact", world.store, "--thin", world.thin]
    cmd = (["forget", world.store, "--user", str(user)] if other == "forget"
           else ["log", world.store, world.spare, "--out", world.thin])
    procs = [subprocess.Popen([sys.executable, "-m", "lmat_platform.cli", *c], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (merge, cmd, merge)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, (p.args, err)
    after = rows(world.thin)
    ids = after.column("request_id").to_pylist()
    old = np.isin(ids, before.column("request_id").to_numpy())
    assert len(ids) == len(set(ids))
    if other == "forget":
        assert after.equals(without(before, user))
    else:
        assert after.select(before.column_names).filter(pa.array(old)).equals(before)
        assert int((~old).sum()) == pq.read_metadata(world.spare).num_rows
    compact_thin(world.store, world.thin)
    assert set(live_files(world.thin).values()) == {1}
    assert rows(world.thin).equals(after)


# ------------------------------------------------------------------------ kills


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("crash"))
    yield h
    h.close()


@pytest.mark.parametrize("mode", ["after", pytest.param("before", marks=pytest.mark.slow)])
def test_compact_thin_killed_at_every_commit_point(harness: Harness, mode: str) -> None:
    """``lmat compact STORE --thin THIN`` SIGKILLed right after (before) each of its commits in
    turn (the tier's, the head summaries', the thin table's merge; after the merge's commit the
    dying writer still holds the store lock), run again, then a forget: the crash harness's
    exact check of the store and of every thin table (each logged request once, none of the
    forgotten user's, histories equal to a naive H(u, T)); the re-run finished the merge."""
    sc = SCENARIOS["compact-thin"]
    thin = harness.world.thin("log")
    done: list[int] = []

    def merged(t: Trial) -> None:
        if set(live_files(thin).values()) == {1}:
            done.append(t.n)

    sweep = harness.sweep(["compact-thin"], modes=(mode,), progress=merged)
    print(sweep.summary())
    assert sweep.commits["compact-thin"] >= 3
    assert not sweep.failures, [(t.n, t.problems[:2]) for t in sweep.failures]
    assert done == list(range(1, sweep.commits["compact-thin"] + 1))
    harness.setup(sc)
    assert min(live_files(thin).values()) >= 2  # (the setup had something to merge)


# ------------------------------------------------------------------------ bad input


def test_bad_thin_argument_is_refused_in_one_line_before_anything_changes(
        world: World, tmp_path: Path, capsys: Any) -> None:
    """``lmat compact STORE --thin URI`` with a URI that is not a thin table of STORE (another
    Delta table, nothing, a file, a thin table of another store), or ``--min-files 0``: one
    line naming it, exit 2, and neither the store's tier nor any thin table touched (the thin
    URIs are checked before the tier is compacted)."""
    other = str(tmp_path / "other")
    init_store(other, n_buckets=2)
    foreign = str(tmp_path / "foreign-thin")
    write_thin(other, world.spare, foreign, path="examples")
    a_file = str(tmp_path / "r.parquet")
    shutil.copy(world.spare, a_file)
    raw = str(Path(world.store) / "raw")
    cases = [
        ([world.store, "--thin", raw], f"{raw}: not an lmat thin table"),
        ([world.store, "--thin", str(tmp_path / "nothing")], "no thin table here"),
        ([world.store, "--thin", a_file], f"{a_file}: is a file, not a thin table"),
        ([world.store, "--thin", world.thin, "--thin", foreign], f"{foreign}: thin table "
         "belongs to store"),
        ([other, "--thin", world.thin], f"{world.thin}: thin table belongs to store"),
        ([world.store, "--thin", world.thin, "--min-files", "0"], "--min-files must be >= 1"),
    ]
    trees = {p: tree(p) for p in (world.store, world.thin, foreign)}
    for args, want in cases:
        rc, out, err = run_main(capsys, ["compact", *args])
        assert rc == 2 and out == "", (args, out)
        assert want in one_line_error(err), (args, err)
        assert {p: tree(p) for p in trees} == trees, args
    rc, out, _ = run_main(capsys, ["compact", world.store, "--thin", world.thin])
    assert rc == 0 and json.loads(out)["thin"][world.thin]["files_out"] == 2


# ------------------------------------------------------------------------ on S3


@pytest.mark.slow
@pytest.mark.parametrize("merge_first", [True, False])
def test_forget_and_merge_interleaved_on_s3(s3_store_uri: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            merge_first: bool) -> None:
    """Both orders again with the store and the thin table on S3 (moto's server on loopback):
    the store's lease, not an fcntl lock, keeps the forget and the merge apart."""
    monkeypatch.setenv("LMAT_LEASE_SECONDS", "5")
    thin = s3_store_uri.rsplit("/", 1)[0] + "/thin"
    world = build(tmp_path, s3_store_uri, thin)
    before = rows(thin)
    user = a_user_in_a_merged_bucket(thin)
    if merge_first:
        ilv = Interleave(monkeypatch, thin, lambda: forget_users(world.store, [user]))
        compact_thin(world.store, thin)
        removed = ilv.join()
    else:
        ilv = Interleave(monkeypatch, thin, lambda: compact_thin(world.store, thin))
        removed = forget_users(world.store, [user])
        ilv.join()
    _check_forgotten(world, before, user, removed)
