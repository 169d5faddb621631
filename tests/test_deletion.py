"""Deletion (spec section 7): forget removes a user everywhere (their events, and their own thin
rows in every registered thin table), for every reader from its tombstone on, even when it is
killed half way; a re-run finishes it; vacuum after retention removes every byte that names the
user, Delta statistics and checkpoints included, outside the tombstone registry."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from lmat_platform.exceptions import LmatError, ThinTableError
from lmat_platform.fatrows import write_fat_rows
from lmat_platform.reader import SequenceLoader
from lmat_platform.reconstruct import materialize
from lmat_platform.store import (
    compact_buckets,
    forget_users,
    forgotten_users,
    ingest_files,
    init_store,
    pending_users,
    publish_snapshot,
    vacuum,
)
from lmat_platform.store.core import Store, storage_options
from lmat_platform.store.deletion import registered_thin_tables, store_tables
from lmat_platform.tenants import Tenant
from lmat_platform.validate import check_uih_commits, delta_log_entries, read_commits
from tests.conftest import SynthStore
from tests.helpers import (
    HOUR_US,
    REPO,
    check_layout,
    read,
    read_delta,
    requests_table,
    run_lmat,
    tier_rows,
    write_events,
)

if TYPE_CHECKING:
    from tests.s3_server import S3Server

ALL = Tenant("all", ("item_id", "event_id", "event_ts", "dwell_ms"), 100_000)
#: A user id whose decimal form (13 digits) and little-endian int64 bytes occur in no other
#: value the store writes by chance: what the byte audit searches every file for.
VICTIM = 7_340_216_598_123
#: A second one, forgotten after the first.
VICTIM2 = 6_118_275_403_967

#: The S3 server fixtures (``s3_server``, ``s3_env``).
pytest_plugins = ("tests.s3_server",)


def _victim(s: SynthStore) -> int:
    """A user with events in the raw log, the tier, the quarantine and a logged tail."""
    st = s.store
    q = read(st, "quarantine")
    in_q = {u for u in q.column("user_id").to_pylist() if u is not None}
    thin = read_delta(s.thin_log)
    with_tail = set(
        thin.filter(pc.greater(thin.column("tail_len"), 0)).column("user_id").to_pylist()
    )
    in_tier = {r["user_id"] for r in tier_rows(st)}
    cands = sorted(in_q & with_tail & in_tier)
    assert cands, "fixture has no user in every table"
    return cands[0]


def _materialized(st: Store | str, thin: str, out: Path) -> pa.Table:
    materialize(st, thin, ALL, str(out))
    return pq.read_table(str(out)).sort_by("request_id")


def _batch_rows(batches: Iterable[Any]) -> Iterator[tuple[int, tuple[int, list[int]]]]:
    """(request_id, (user, event ids)) of every request of ``batches``."""
    for b in batches:
        off = np.concatenate([[0], np.cumsum(b.lengths.numpy())])
        ev = b.values["event_id"].tolist()
        for i, (r, u) in enumerate(zip(b.request_id.tolist(), b.user_id.tolist(), strict=True)):
            yield r, (u, ev[off[i]:off[i + 1]])


def _loader_rows(st: Store | str, thin: str) -> dict[int, tuple[int, list[int]]]:
    """request_id -> (user, event ids) over one loader pass (several units and batches)."""
    loader = SequenceLoader(st, thin, tenant=ALL, batch_size=13, max_unit_rows=16)
    out: dict[int, tuple[int, list[int]]] = {}
    for r, row in _batch_rows(loader):
        assert r not in out
        out[r] = row
    assert len(out) == loader.num_requests
    return out


def _others(t: pa.Table, u: int) -> pa.Table:
    return t.filter(pc.not_equal(t.column("user_id"), u))


def test_forget_removes_the_user_everywhere_and_their_examples(
    synth_store: SynthStore, tmp_path: Path
) -> None:
    s = synth_store
    st = s.store
    u = _victim(s)
    assert sorted(registered_thin_tables(st)) == sorted([s.thin_log, s.thin_batch])
    ev_ids = {r["event_id"] for r in read(st, "raw").to_pylist() if r["user_id"] == u}
    n_heads = read(st, "heads").num_rows
    thin_rows = {t: read_delta(t).num_rows for t in (s.thin_log, s.thin_batch)}
    mine = {t: int(pc.sum(pc.equal(read_delta(t).column("user_id"), u)).as_py())
            for t in (s.thin_log, s.thin_batch)}
    assert all(mine.values())
    before = {t: _materialized(st, t, tmp_path / f"before-{i}.parquet")
              for i, t in enumerate((s.thin_log, s.thin_batch))}

    removed = forget_users(st, [u])
    assert removed["raw"] == len(ev_ids) and removed["uih"] > 0 and removed["quarantine"] > 0
    assert removed["heads"] > 0
    assert all(removed[f"thin:{t}"] == n for t, n in mine.items())
    assert forgotten_users(st).tolist() == [u] and pending_users(st).tolist() == []

    for name in ("raw", "quarantine", "uih", "heads"):
        assert u not in read(st, name).column("user_id").to_pylist(), name
    assert read(st, "heads").num_rows == n_heads - removed["heads"]
    # The user's examples are gone whole (requests, pointers, tails); everyone else's stay.
    for t, n in thin_rows.items():
        after = read_delta(t)
        assert u not in after.column("user_id").to_pylist()
        assert after.num_rows == n - mine[t]
    assert u not in set(pc.list_flatten(read_delta(s.thin_log).column("tail_user_id")).to_pylist())
    assert not any(r["user_id"] == u for r in tier_rows(st))
    # ... and the tier keeps its layout (sorted files, row groups, stats) for everyone else.
    check_layout(st)

    for i, t in enumerate((s.thin_log, s.thin_batch)):
        got = _materialized(st, t, tmp_path / f"after-{i}.parquet")
        assert u not in got.column("user_id").to_pylist()
        assert got.equals(_others(before[t], u))
    assert check_uih_commits(read_commits(delta_log_entries(st.table_uri("uih")))).ok


_KILL = """
import os, signal, sys
from lmat_platform.store import deletion, thin_registry

point = sys.argv[3]


def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)


if point == "after_tombstone":
    deletion._purge = die
elif point == "mid_deletion":  # the store's tables done, the thin tables not
    deletion.purge_thin_rows = die
elif point == "before_completion":
    write = deletion._write_registry

    def guarded(store, table, *, op, users):
        if op == "forget_done":
            die()
        write(store, table, op=op, users=users)

    deletion._write_registry = guarded
deletion.forget_users(sys.argv[1], [int(sys.argv[2])])
"""


def _killed_forget(store: str, user: int, point: str) -> None:
    r = subprocess.run([sys.executable, "-c", _KILL, store, str(user), point], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("point", ["after_tombstone", "mid_deletion", "before_completion"])
def test_a_killed_forget_is_invisible_to_readers_and_a_rerun_finishes_it(
    synth_store: SynthStore, tmp_path: Path, point: str
) -> None:
    s = synth_store
    st = s.store
    u = _victim(s)
    before = {t: _materialized(st, t, tmp_path / f"before-{i}.parquet")
              for i, t in enumerate((s.thin_log, s.thin_batch))}
    # What the loader yields equals what materialize writes (tests/test_reader.py).
    bl = before[s.thin_log]
    loader_want = {r: (uu, ev) for r, uu, ev in zip(
        bl.column("request_id").to_pylist(), bl.column("user_id").to_pylist(),
        bl.column("event_id").to_pylist(), strict=True) if uu != u}

    _killed_forget(s.store_path, u, point)
    assert pending_users(st).tolist() == [u]
    if point == "after_tombstone":
        # Nothing is deleted yet: what readers do not see, they hide.
        assert u in read(st, "raw").column("user_id").to_pylist()
        assert u in read_delta(s.thin_log).column("user_id").to_pylist()
    if point == "mid_deletion":
        assert u not in read(st, "raw").column("user_id").to_pylist()
        assert u in read_delta(s.thin_batch).column("user_id").to_pylist()
    for i, t in enumerate((s.thin_log, s.thin_batch)):
        # materialize: none of the user's requests, everyone else's exactly as before.
        got = _materialized(st, t, tmp_path / f"killed-{i}.parquet")
        assert got.equals(_others(before[t], u))
    # SequenceLoader: the same requests, every one once.
    assert _loader_rows(st, s.thin_log) == loader_want
    # The fat-row baseline (requests from a file, not the store) reads none of the user's events.
    write_fat_rows(st, s.requests_all, ALL, str(tmp_path / "fat.parquet"))
    fat = pq.read_table(str(tmp_path / "fat.parquet"))
    mine = fat.filter(pc.equal(fat.column("user_id"), u))
    assert mine.num_rows and set(mine.column("length").to_pylist()) == {0}
    assert _others(fat, u).sort_by("request_id").select(["request_id", "length"]).equals(
        _others(before[s.thin_batch], u).select(["request_id", "length"]))

    if point == "after_tombstone":
        # Any later forget finishes a killed one: here one of another user (with no requests,
        # so that everyone else's outputs below stay as they were).
        thin_users = set(read_delta(s.thin_log).column("user_id").to_pylist())
        other = next(v for v in sorted(set(read(st, "raw").column("user_id").to_pylist()))
                     if v not in thin_users)
        removed = forget_users(st, [other])
        assert removed["raw"] > 0 and removed[f"thin:{s.thin_log}"] > 0
        assert other not in read(st, "raw").column("user_id").to_pylist()
        gone = sorted([u, other])
    else:
        forget_users(st, [u])  # the re-run finishes the physical deletion
        gone = [u]
    assert pending_users(st).tolist() == [] and forgotten_users(st).tolist() == gone
    assert read(st, "forgotten").num_rows == len(gone)
    for name in ("raw", "quarantine", "uih", "heads"):
        assert u not in read(st, name).column("user_id").to_pylist(), name
    for t in (s.thin_log, s.thin_batch):
        assert u not in read_delta(t).column("user_id").to_pylist()
    got = _materialized(st, s.thin_batch, tmp_path / "after.parquet")
    assert got.equals(_others(before[s.thin_batch], u))


def test_a_loader_built_before_a_forget_refuses_to_serve_the_user(
    synth_store: SynthStore
) -> None:
    """A loader pins its thin table version, which still holds a user forgotten since: its
    next pass is refused (it would serve their requests); a new loader serves the rest."""
    s = synth_store
    st = s.store
    u = _victim(s)
    before = _loader_rows(st, s.thin_log)
    loader = SequenceLoader(st, s.thin_log, tenant=ALL, batch_size=64)
    thin_users = set(read_delta(s.thin_log).column("user_id").to_pylist())
    absent = next(v for v in sorted(set(read(st, "raw").column("user_id").to_pylist()))
                  if v not in thin_users)
    forget_users(st, [absent])  # holds no request of this table: the pass goes on
    assert sum(len(b.request_id) for b in loader) == len(before)
    forget_users(st, [u])
    with pytest.raises(ThinTableError, match="build a new SequenceLoader"):
        next(iter(loader))
    assert _loader_rows(st, s.thin_log) == {r: v for r, v in before.items() if v[0] != u}


def test_rerunning_forget_does_not_grow_the_tombstone_registry(synth_store: SynthStore) -> None:
    st = synth_store.store
    users = sorted(set(read(st, "raw").column("user_id").to_pylist()))[:3]
    forget_users(st, users[:2])
    raw = read(st, "raw").num_rows
    for _ in range(3):
        removed = forget_users(st, users[:2])
        assert all(v == 0 for v in removed.values())
    forget_users(st, [users[1], users[2]])
    reg = read(st, "forgotten")
    assert sorted(reg.column("user_id").to_pylist()) == users
    assert read(st, "raw").num_rows < raw


def test_events_that_arrive_later_are_accepted_as_new(
    synth_store: SynthStore, tmp_path: Path
) -> None:
    s = synth_store
    st = s.store
    u = _victim(s)
    forget_users(st, [u])
    last_wm = int(read(st, "snapshots").column("watermark").to_numpy().max())
    t0 = last_wm + HOUR_US
    new = [{"user_id": u, "event_id": 9_000_000 + i, "event_ts": t0 + i, "arrival_ts": t0 + i,
            "item_id": 7, "action": 1, "dwell_ms": 1.0} for i in range(3)]
    res = ingest_files(st, [write_events(tmp_path / "new.parquet", new, traits=["dwell_ms"])])
    assert res.accepted == 3
    publish_snapshot(st, t0 + 10, published_at=t0 + 20)
    req = tmp_path / "req.parquet"
    pq.write_table(requests_table([
        {"request_id": 10**9, "user_id": u, "request_ts": t0 + 2},  # the tail: 2 events
        {"request_id": 10**9 + 1, "user_id": u, "request_ts": t0 + 30},  # the head: 3 events
    ]), str(req))
    from lmat_platform.protocol.thin import write_thin

    for path, out in (("log", tmp_path / "thin-log"), ("examples", tmp_path / "thin-ex")):
        write_thin(st, str(req), str(out), path=path)
        got = _materialized(st, str(out), tmp_path / f"{path}.parquet")
        assert got.column("event_id").to_pylist() == [[9_000_000, 9_000_001],
                                                      [9_000_000, 9_000_001, 9_000_002]]


def test_forget_via_cli_with_vacuum(synth_store: SynthStore) -> None:
    s = synth_store
    u = _victim(s)
    r = run_lmat("forget", s.store_path, "--user", str(u), "--user", str(u), "--vacuum")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(r.stdout.strip().splitlines()) == 1
    assert out["users"] == 1 and out["removed"]["raw"] > 0 and out["vacuumed_files"] > 0
    for t in (s.thin_log, s.thin_batch):
        assert u not in read_delta(t).column("user_id").to_pylist()


def test_forget_needs_a_user(synth_store_ro: SynthStore) -> None:
    with pytest.raises(LmatError, match="--user"):
        forget_users(synth_store_ro.store_path, [])


def test_forget_of_an_unknown_user_changes_no_data(synth_store: SynthStore) -> None:
    st = synth_store.store
    raw = read(st, "raw").num_rows
    removed = forget_users(st, [int(np.iinfo(np.int64).max)])
    assert all(v == 0 for v in removed.values())
    assert read(st, "raw").num_rows == raw


# --------------------------------------------------------------------------- the byte audit


def _audit_store(store_uri: str, thins: list[str], root: Path) -> Store:
    """A small store at ``store_uri`` (landing files under ``root``), with a streaming and a
    batch thin table at ``thins``, in which user VICTIM is everywhere: the raw log, the quarantine, two
    snapshots of the tier (compacted), head summaries, streamed tails and batch examples, with a
    Delta checkpoint of every table and thin table written before the deletion (their
    statistics name the victim: it is the largest user id)."""
    st = init_store(store_uri, n_buckets=4, row_group_rows=64)
    users = [*range(1, 11), VICTIM2, VICTIM]
    rng = np.random.default_rng(0)
    day = 24 * HOUR_US
    base = 1_700_000_000_000_000
    eid = 1
    for d in range(2):
        rows = []
        for u in users:
            for _ in range(8):
                ts = base + d * day + int(rng.integers(0, day - HOUR_US))
                rows.append({"user_id": u, "event_id": eid, "event_ts": ts, "arrival_ts": ts + 5,
                             "item_id": int(rng.integers(1, 50)), "action": 1, "dwell_ms": 2.0})
                eid += 1
        # One bad row of the victim: event_ts after arrival_ts -> quarantined.
        rows.append({"user_id": VICTIM, "event_id": eid, "event_ts": base + d * day + 10,
                     "arrival_ts": base + d * day, "item_id": 1, "action": 1, "dwell_ms": 1.0})
        eid += 1
        ingest_files(st, [write_events(root / f"ev{d}.parquet", rows, traits=["dwell_ms"])])
        publish_snapshot(st, base + (d + 1) * day, published_at=base + (d + 1) * day + HOUR_US)
    compact_buckets(st)
    req = [{"request_id": 100 * u + k, "user_id": u, "request_ts": base + day + (k + 2) * HOUR_US}
           for u in users for k in range(3)]
    pq.write_table(requests_table(req), str(root / "req.parquet"))
    from lmat_platform.protocol.thin import write_thin

    write_thin(st, str(root / "req.parquet"), thins[0], path="log")
    write_thin(st, str(root / "req.parquet"), thins[1], path="examples")
    for uri in store_tables(st) + thins:
        DeltaTable(uri, storage_options=storage_options()).create_checkpoint()
    return st


def _values_naming(arr: pa.Array, uid: int) -> bool:
    """Whether any value of a decoded Parquet column (nested ones too) is ``uid`` or a string
    holding it."""
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _values_naming(arr.flatten(), uid)
    if pa.types.is_map(t):
        return _values_naming(arr.keys, uid) or _values_naming(arr.items, uid)
    if pa.types.is_struct(t):
        return any(_values_naming(arr.field(i), uid) for i in range(t.num_fields))
    if pa.types.is_integer(t):
        return bool(pc.any(pc.equal(arr, uid)).as_py())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return bool(pc.any(pc.match_substring(arr, str(uid))).as_py())
    return False


def _naming(files: Iterable[tuple[str, bytes]], uid: int) -> list[str]:
    """Names of the ``(name, bytes)`` files whose bytes hold ``uid`` as a little-endian int64 or
    as a decimal string, or (Parquet: data files and Delta checkpoints, whose pages may be
    compressed) whose decoded values do."""
    le, dec = struct.pack("<q", uid), str(uid).encode()
    hits = []
    for name, blob in files:
        if le in blob or dec in blob:
            hits.append(name)
        elif name.endswith(".parquet"):
            t = pq.read_table(pa.BufferReader(blob))
            if any(_values_naming(c.combine_chunks(), uid) for c in t.columns):
                hits.append(name)
    return sorted(hits)


def _files_naming(roots: list[str], uid: int, *, skip: str | None = None) -> list[str]:
    """:func:`_naming` over every file under the local directories ``roots``; ``skip``: a
    directory left out."""

    def files() -> Iterator[tuple[str, bytes]]:
        for root in roots:
            for dirpath, _, names in os.walk(root):
                if skip and (dirpath == skip or dirpath.startswith(skip + os.sep)):
                    continue
                for n in names:
                    p = os.path.join(dirpath, n)
                    yield p, Path(p).read_bytes()

    return _naming(files(), uid)


def test_after_vacuum_no_byte_names_the_user_outside_the_tombstones(tmp_path: Path) -> None:
    thins = [str(tmp_path / "thin" / "log"), str(tmp_path / "thin" / "examples")]
    st = _audit_store(str(tmp_path / "store"), thins, tmp_path)
    roots = [st.root, *thins]
    tombs = os.path.join(st.root, "forgotten")
    others = {t: _materialized(st, t, tmp_path / f"b{i}.parquet") for i, t in enumerate(thins)}
    # The audit can see the user: in data files, commit statistics and checkpoints alike.
    hits = _files_naming(roots, VICTIM)
    assert any(h.endswith(".checkpoint.parquet") for h in hits)
    assert any(h.endswith(".json") for h in hits)
    for part in ("raw", "quarantine", "uih", "heads", "thin/log", "thin/examples"):
        assert any(f"/{part}/" in h for h in hits), part

    forget_users(st, [VICTIM])
    # Deleted for every reader, but the bytes stay until vacuum (time travel, retention).
    assert _files_naming(roots, VICTIM, skip=tombs)
    out = vacuum(st, retention_hours=0)
    assert sum(out.values()) > 0 and set(thins) <= set(out)
    assert _files_naming(roots, VICTIM, skip=tombs) == []
    assert _files_naming([tombs], VICTIM)  # the tombstone remains, on purpose
    # The store and its thin tables still serve everyone else, exactly.
    for i, t in enumerate(thins):
        got = _materialized(st, t, tmp_path / f"a{i}.parquet")
        assert got.num_rows == 33 and got.equals(_others(others[t], VICTIM))
    # A second forget and vacuum on the vacuumed store leave no trace of either.
    assert _files_naming(roots, VICTIM2, skip=tombs)
    forget_users(st, [VICTIM2])
    vacuum(st, retention_hours=0)
    assert _files_naming(roots, VICTIM2, skip=tombs) == []
    assert _files_naming(roots, VICTIM, skip=tombs) == []
    assert read(st, "forgotten").num_rows == 2


@pytest.mark.slow
def test_forget_and_vacuum_on_object_storage_leave_no_byte(
    s3_env: dict[str, str], s3_server: S3Server, tmp_path: Path
) -> None:
    """The same audit on an ``s3://`` store and thin tables (a real S3-compatible server on
    loopback): every object of the bucket, outside the tombstone registry."""
    bucket = s3_env["LMAT_TEST_BUCKET"]
    store_uri = f"s3://{bucket}/store"
    thins = [f"s3://{bucket}/thin/log", f"s3://{bucket}/thin/examples"]
    st = _audit_store(store_uri, thins, tmp_path)
    client = s3_server.client()

    def objects() -> Iterator[tuple[str, bytes]]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                if not o["Key"].startswith("store/forgotten/"):
                    yield o["Key"], client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()

    assert any(k.startswith("thin/") for k in _naming(objects(), VICTIM))
    forget_users(st, [VICTIM])
    for t in thins:
        assert VICTIM not in read_delta(t).column("user_id").to_pylist()
    vacuum(st, retention_hours=0)
    assert _naming(objects(), VICTIM) == []
    assert read(st, "raw").num_rows == 2 * 11 * 8


@pytest.mark.ray
@pytest.mark.slow
def test_ray_backend_does_not_serve_a_pending_user(synth_store: SynthStore) -> None:
    """The Ray Data backend plans and reads units as the loader does: a user whose forget was
    killed after its tombstone is absent from its pass too."""
    pytest.importorskip("ray")
    import ray

    from lmat_platform.reader.ray_backend import ensure_ray, iter_ray_batches

    s = synth_store
    u = _victim(s)
    want = {r: v for r, v in _loader_rows(s.store, s.thin_log).items() if v[0] != u}
    _killed_forget(s.store_path, u, "after_tombstone")
    assert u in read_delta(s.thin_log).column("user_id").to_pylist()
    ensure_ray(num_cpus=2)
    try:
        batches = list(iter_ray_batches(s.store, s.thin_log, tenant=ALL, batch_size=16,
                                        max_unit_rows=16))
    finally:
        ray.shutdown()
    got = dict(_batch_rows(batches))
    assert got == want


@pytest.mark.slow
def test_forget_killed_at_every_commit_by_the_fault_switch(
    synth_store: SynthStore, tmp_path: Path
) -> None:
    """``lmat forget`` SIGKILLed right after each of its commits in turn (the store's fault
    switch, LMAT_FAULT_KILL_AFTER_COMMIT=N), on copies of one store: after every kill no reader
    serves the user, and a re-run completes the deletion."""
    import shutil

    from tests.conftest import copy_synth

    s0 = synth_store
    u = _victim(s0)
    base = {i: _others(_materialized(s0.store, t, tmp_path / f"b{i}.parquet"), u)
            for i, t in enumerate((s0.thin_log, s0.thin_batch))}
    n = 0
    while True:
        n += 1
        s = copy_synth(s0, tmp_path / f"k{n}")
        r = run_lmat("forget", s.store_path, "--user", str(u),
                     env={"LMAT_FAULT_KILL_AFTER_COMMIT": str(n)})
        if r.returncode == 0:
            break  # fewer than n commits: every kill point was tried
        assert r.returncode == -signal.SIGKILL, r.stderr
        st = s.store
        assert pending_users(st).tolist() in ([u], [])
        for i, t in enumerate((s.thin_log, s.thin_batch)):
            got = _materialized(st, t, tmp_path / f"k{n}-{i}.parquet")
            assert got.equals(base[i]), (n, t)
        r = run_lmat("forget", s.store_path, "--user", str(u))
        assert r.returncode == 0, r.stderr
        assert pending_users(st).tolist() == [] and read(st, "forgotten").num_rows == 1
        for name in ("raw", "quarantine", "uih", "heads"):
            assert u not in read(st, name).column("user_id").to_pylist(), (n, name)
        for t in (s.thin_log, s.thin_batch):
            assert u not in read_delta(t).column("user_id").to_pylist(), (n, t)
        shutil.rmtree(s.root)
    assert n > 8  # tombstone, raw, quarantine, heads, ids, tier, 2 thin tables, completion
