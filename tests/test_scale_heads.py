"""Head summaries extended with the new events only (issue 15, item 2): lengths and checksums
equal a recomputation over the whole head, every marker is a lower bound of its exact value
within 2x of its length, and publish reads a bounded number of old rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.store import ingest_files, init_store, publish_snapshot
from lmat_platform.store.core import Store
from lmat_platform.store.heads import LATEST, MARKER_LENGTHS, NO_MARKER, marker_slack
from lmat_platform.store.snapshots import head_summaries
from tests.helpers import read

HOUR = 3_600_000_000


def _events(path: Path, users: np.ndarray, ets: np.ndarray, ats: np.ndarray, first_id: int) -> str:
    n = len(users)
    pq.write_table(pa.table({
        "user_id": pa.array(users, pa.int64()),
        "event_id": pa.array(first_id + np.arange(n), pa.int64()),
        "event_ts": pa.array(ets, pa.int64()),
        "arrival_ts": pa.array(ats, pa.int64()),
        "item_id": pa.array(np.ones(n, np.int64)),
        "action": pa.array(np.ones(n, np.int16)),
    }), path)
    return str(path)


def _check_heads(store: Store, k: int) -> None:
    slack = marker_slack(store.config.row_group_rows)
    h = read(store, "heads")
    h = h.filter(pa.array(h.column("snapshot_id").to_numpy() == k))
    got = {r["user_id"]: r for r in h.to_pylist()}
    tier = read(store, "uih")
    for b in np.unique(h.column("bucket").to_numpy()).tolist():
        users = np.array(sorted(u for u, r in got.items() if r["bucket"] == b), np.int64)
        ref = head_summaries(store, b, users, k).to_pylist()
        for want in ref:
            r = got[want["user_id"]]
            assert (r["head_len"], r["head_checksum"]) == (want["head_len"], want["head_checksum"])
            ts = tier.filter(pa.array(
                (tier.column("user_id").to_numpy() == want["user_id"])
                & (tier.column("snapshot_id").to_numpy() <= k))).column("event_ts").to_numpy()
            for m, mk, exact in zip(MARKER_LENGTHS, r["markers"], want["markers"], strict=True):
                if want["head_len"] < m:
                    assert mk == NO_MARKER
                    continue
                # A lower bound (none: read the whole head) within its slack (twice its
                # length here, or a row group): the reader never reads much more than it needs.
                assert mk <= exact
                assert m <= int((ts >= mk).sum()) <= slack[MARKER_LENGTHS.index(m)]


def test_extended_heads_match_a_full_recomputation(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    users_pool = np.array([1, 2, 3, 4, 5], np.int64)
    weights = np.array([0.6, 0.2, 0.1, 0.07, 0.03])
    eid = 0
    t0 = 10 * HOUR
    for k in range(10):
        n = int(rng.integers(5, 180))
        users = rng.choice(users_pool, size=n, p=weights)
        ats = t0 + k * HOUR + np.sort(rng.integers(0, HOUR, n))
        late = rng.random(n) < 0.2  # late events land inside the head, hours back
        ets = np.where(late, ats - rng.integers(HOUR, 9 * HOUR, n), ats - rng.integers(0, 1000, n))
        ets = np.where(rng.random(n) < 0.1, ets - ets % 1000, ets)  # ties of event_ts
        ingest_files(store, [_events(tmp_path / f"e{k}.parquet", users, ets, ats, eid)])
        eid += n
        publish_snapshot(store, t0 + (k + 1) * HOUR)
        _check_heads(store, k)
    # Markers were refreshed (user 1 outran them) and extended without reading otherwise.
    hist = store.open_table("heads").history()
    refreshed = [int(h["lmat.refreshed_users"]) for h in hist if "lmat.refreshed_users" in h]
    assert any(refreshed) and refreshed.count(0) >= 1, refreshed
    assert read(store, LATEST).num_rows >= 5


def test_publish_reads_a_bounded_number_of_old_rows(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=1, row_group_rows=64)
    n = 20_000  # one user's long history, in one snapshot
    ets = 10 * HOUR + np.arange(n) * 1000
    ingest_files(store, [_events(tmp_path / "a.parquet", np.ones(n, np.int64), ets, ets + 1, 0)])
    publish_snapshot(store, int(ets[-1]) + 10)
    rows_read = []
    for k in range(1, 22):  # then 10 new events per snapshot
        e = int(ets[-1]) + k * 100_000 + np.arange(10) * 1000
        ingest_files(store, [_events(tmp_path / f"b{k}.parquet", np.ones(10, np.int64), e,
                                     e + 1, n + 10 * k)])
        publish_snapshot(store, int(e[-1]) + 10)
        h = store.open_table("heads").history(1)[0]
        rows_read.append(int(h.get("lmat.rows_read", -1)))
    # Each refresh reads about 4x the stale length (64 -> 128..256 rows), not the 20,000.
    assert any(rows_read) and 0 <= max(rows_read) <= 600, rows_read
    assert sum(rows_read) <= 21 * 10 * 40, rows_read  # amortized O(new events)
    _check_heads(store, 21)


def test_markers_more_precise_than_a_row_group_are_not_refreshed(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=1, row_group_rows=1024)
    n = 5_000
    ets = 10 * HOUR + np.arange(n) * 1000
    ingest_files(store, [_events(tmp_path / "a.parquet", np.ones(n, np.int64), ets, ets + 1, 0)])
    publish_snapshot(store, int(ets[-1]) + 10)
    for k in range(1, 13):
        e = int(ets[-1]) + k * 100_000 + np.arange(50) * 1000
        ingest_files(store, [_events(tmp_path / f"b{k}.parquet", np.ones(50, np.int64), e,
                                     e + 1, n + 50 * k)])
        publish_snapshot(store, int(e[-1]) + 10)
        assert int(store.open_table("heads").history(1)[0]["lmat.rows_read"]) == 0
    _check_heads(store, 12)  # lower bounds within a row group (1,024) of the 64..512 lengths


def test_store_published_before_heads_latest_is_extended_from_its_heads(tmp_path: Path) -> None:
    import shutil

    rng = np.random.default_rng(9)
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    for k in range(3):
        n = 150
        users = rng.integers(1, 6, n).astype(np.int64)
        ats = (10 + k) * HOUR + np.sort(rng.integers(0, HOUR, n))
        ingest_files(store, [_events(tmp_path / f"e{k}.parquet", users, ats - 7, ats, k * n)])
        if k == 2:  # a store written before heads_latest existed
            shutil.rmtree(tmp_path / "s" / LATEST)
        publish_snapshot(store, (11 + k) * HOUR)
    _check_heads(store, 2)
