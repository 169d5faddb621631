"""The UIH tier's physical layout: buckets, sort order, row groups, statistics, compaction,
pruned reads, and readability by other Delta readers."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from lmat_platform.store import compact_buckets, uih
from lmat_platform.validate import check_uih_commits, delta_log_entries, read_commits
from tests.conftest import SynthStore
from tests.helpers import assert_sorted, check_layout, read, tier_rows, uih_users_by_bucket


def test_tier_files_are_bucketed_sorted_and_have_row_group_stats(
    synth_store_ro: SynthStore,
) -> None:
    store = synth_store_ro.store
    files = check_layout(store)
    # One generation file per bucket per snapshot that touched it; several row groups each.
    assert len(files) > store.n_buckets
    assert any(
        pq.ParquetFile(f"{store.root}/uih/{f.path}").metadata.num_row_groups > 1 for f in files
    )
    by_bucket = uih_users_by_bucket(store)
    assert set(by_bucket) <= set(range(store.n_buckets)) and len(by_bucket) > 1


def test_compaction_is_layout_only(synth_store: SynthStore) -> None:
    store = synth_store.store
    before = tier_rows(store)
    v0 = store.open_table("uih").version()
    out = compact_buckets(store)
    assert out["files_in"] > out["files_out"] > 0
    files = check_layout(store)
    # One compaction per bucket, cut into stripes by rank from each user's end.
    for b in {f.bucket for f in files}:
        names = [os.path.basename(f.path) for f in files if f.bucket == b]
        assert len({n.split("-s")[0] for n in names}) == 1, names
        assert len({n.split("-")[2] for n in names}) == len(names), names
    assert tier_rows(store) == before
    commits = read_commits(delta_log_entries(store.table_uri("uih")))
    last = commits[-1]
    assert last["version"] == v0 + 1
    assert last["commitInfo"]["lmat.op"] == "compact"
    assert last["add"] and last["remove"]
    assert all(a["dataChange"] is False for a in last["add"])
    assert all(r["dataChange"] is False for r in last["remove"])
    rows_in = sum(
        json.loads(a["stats"])["numRecords"]
        for c in commits[:-1]
        for a in c["add"]
        if a["path"] in {r["path"] for r in last["remove"]}
    )
    assert rows_in == sum(json.loads(a["stats"])["numRecords"] for a in last["add"])
    assert check_uih_commits(commits).ok
    # Nothing left to compact: a second run is a no-op.
    assert compact_buckets(store)["files_in"] == 0
    assert store.open_table("uih").version() == v0 + 1


def test_polars_reads_the_uih_tier(synth_store_ro: SynthStore) -> None:
    store = synth_store_ro.store
    df = pl.read_delta(store.table_uri("uih"))
    want = read(store, "uih")
    assert df.height == want.num_rows > 0
    assert set(want.column_names) <= set(df.columns)
    got = df.sort("event_id").select(["event_id", "user_id", "event_ts", "snapshot_id", "bucket"])
    ref = pl.from_arrow(want).sort("event_id").select(got.columns)
    assert got.cast(ref.schema).equals(ref)


def test_read_bucket_prunes_row_groups_by_user_and_time(synth_store: SynthStore) -> None:
    store = synth_store.store
    compact_buckets(store)
    dt = store.open_table("uih")
    files = uih.list_files(dt)
    by_bucket = uih_users_by_bucket(store)
    b = max(by_bucket, key=lambda k: len(by_bucket[k]))
    users, counts = np.unique(by_bucket[b], return_counts=True)
    bfiles = [f for f in files if f.bucket == b]
    lo = np.iinfo(np.int64).min
    full = uih.read_bucket(
        store,
        bfiles,
        users=users,
        cutoffs=np.full(len(users), lo),
        columns=["item_id"],
        actions=None,
        max_snapshot=10,
    )
    assert full.table.num_rows == len(by_bucket[b])
    one = users[np.argmin(counts)][None]
    small = uih.read_bucket(
        store,
        bfiles,
        users=one,
        cutoffs=np.array([lo]),
        columns=["item_id"],
        actions=None,
        max_snapshot=10,
    )
    assert set(small.table.column("user_id").to_pylist()) == {int(one[0])}
    assert small.table.num_rows == counts.min()
    assert small.row_groups_read < full.row_groups_read
    assert small.row_groups_skipped > 0
    assert small.bytes_read < full.bytes_read
    # A time cutoff skips the user's older row groups and keeps exactly the rows at or after it.
    heavy = users[np.argmax(counts)][None]
    ts = np.sort(
        tier_ts := np.array(
            [r["event_ts"] for r in tier_rows(store) if r["user_id"] == int(heavy[0])]
        )
    )
    cut = int(ts[-10])
    recent = uih.read_bucket(
        store,
        bfiles,
        users=heavy,
        cutoffs=np.array([cut]),
        columns=["item_id"],
        actions=None,
        max_snapshot=10,
    )
    allh = uih.read_bucket(
        store,
        bfiles,
        users=heavy,
        cutoffs=np.array([lo]),
        columns=["item_id"],
        actions=None,
        max_snapshot=10,
    )
    assert recent.table.num_rows == int((tier_ts >= cut).sum())
    assert recent.row_groups_read < allh.row_groups_read
    _sorted = recent.table.select(uih.SORT_KEYS)
    assert_sorted(_sorted)
    # Not exact: the same row groups, every row of them, one array per column; the exact rows
    # are among them, and an action filter still applies.
    loose = uih.read_bucket(store, bfiles, users=heavy, cutoffs=np.array([cut]),
                            columns=["item_id", "action"], actions=None, max_snapshot=10,
                            exact=False)
    assert loose.row_groups_read == recent.row_groups_read
    assert all(c.num_chunks == 1 for c in loose.table.columns)
    assert_sorted(loose.table.select(uih.SORT_KEYS))
    assert loose.table.num_rows > recent.table.num_rows
    ids = set(loose.table.column("event_id").to_pylist())
    assert set(recent.table.column("event_id").to_pylist()) <= ids
    act = int(loose.table.column("action")[0].as_py())
    only = uih.read_bucket(store, bfiles, users=heavy, cutoffs=np.array([cut]),
                           columns=["item_id"], actions=np.array([act], dtype=np.int16),
                           max_snapshot=10, exact=False)
    want = [i for i, a in zip(loose.table.column("event_id").to_pylist(),
                              loose.table.column("action").to_pylist(), strict=True) if a == act]
    assert only.table.column("event_id").to_pylist() == want


def test_row_group_pruning_matches_a_per_row_group_check() -> None:
    import numpy as np

    from lmat_platform.store.uih import RowGroupStats, _row_groups_wanted

    rng = np.random.default_rng(0)
    for _ in range(500):
        G, U = int(rng.integers(1, 12)), int(rng.integers(0, 15))
        users = np.sort(rng.choice(100, U, replace=False)).astype(np.int64)
        cut = rng.integers(0, 50, U).astype(np.int64)
        umin = np.sort(rng.integers(0, 100, G))
        st = RowGroupStats(rows=np.ones(G), umin=umin, umax=umin + rng.integers(0, 20, G),
                           tmax=rng.integers(0, 60, G), smin=rng.integers(0, 4, G))
        max_snap = int(rng.integers(0, 4))
        min_ts = None if rng.random() < 0.5 else int(rng.integers(0, 60))
        want = []
        for g in range(G):
            mine = (users >= st.umin[g]) & (users <= st.umax[g])
            if not mine.any() or st.smin[g] > max_snap:
                continue  # none of the users, or only newer snapshots
            if st.tmax[g] < cut[mine].min() or (min_ts is not None and st.tmax[g] < min_ts):
                continue  # older than everything the users need
            want.append(g)
        assert _row_groups_wanted(st, users, cut, max_snap, min_ts) == want


def test_shared_table_state_sees_a_table_written_again_at_the_same_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The read path shares opened table versions and remembers small reads per version; a
    table deleted and written again at the same path (version 0 again) is read afresh."""
    import shutil

    import pyarrow as pa
    from deltalake import write_deltalake

    from lmat_platform.store.core import Store, StoreConfig, shared_delta_table

    st = Store(str(tmp_path), StoreConfig("s", 2, 1024, 1))
    path = str(tmp_path / "snapshots")
    write_deltalake(path, pa.table({"x": [1]}))
    assert st.read_table("snapshots").column("x").to_pylist() == [1]
    assert st.read_table("snapshots") is st.read_table("snapshots")  # remembered per version
    shutil.rmtree(path)
    write_deltalake(path, pa.table({"x": list(range(10, 20))}))
    assert shared_delta_table(path).version() == 0
    assert st.read_table("snapshots").column("x").to_pylist() == list(range(10, 20))
    write_deltalake(path, pa.table({"x": [99]}), mode="append")
    assert len(st.read_table("snapshots")) == 11  # a new commit is seen at once
