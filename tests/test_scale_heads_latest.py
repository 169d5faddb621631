"""``heads_latest`` (issue 15, item 2): publish reads only the touched users' previous summaries
(row groups whose user range holds one), and folding a bucket's files keeps each user's newest
summary while reading only the newest files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform.store import forget_users, heads, ingest_files, init_store, publish_snapshot
from lmat_platform.store.core import Store
from tests.helpers import read
from tests.test_scale_heads import HOUR, _check_heads, _events


def _latest_equals_heads(store: Store) -> None:
    """Each user's newest ``heads_latest`` row is its newest ``heads`` row (length, checksum,
    markers)."""
    def newest(t: pa.Table) -> dict[int, tuple[int, int, int, list[int]]]:
        out: dict[int, tuple[int, int, int, list[int]]] = {}
        for r in t.to_pylist():
            if r["user_id"] not in out or out[r["user_id"]][0] < r["snapshot_id"]:
                out[r["user_id"]] = (r["snapshot_id"], r["head_len"], r["head_checksum"],
                                     list(r["markers"]))
        return out

    assert newest(read(store, heads.LATEST)) == newest(read(store, "heads"))


def test_publish_reads_only_the_touched_users_rows(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    n_users = 20_000
    users = np.arange(1, n_users + 1, dtype=np.int64)
    t0 = 10 * HOUR
    ats = t0 + np.arange(n_users, dtype=np.int64)
    ingest_files(store, [_events(tmp_path / "a.parquet", users, ats - 5, ats, 0)])
    publish_snapshot(store, t0 + HOUR)
    # The next hour touches 3 users of 20,000: their previous rows are a row group each.
    few = np.array([7, 9_001, 19_999], np.int64)
    ats = t0 + HOUR + np.arange(3, dtype=np.int64)
    ingest_files(store, [_events(tmp_path / "b.parquet", few, ats - 5, ats, n_users)])
    publish_snapshot(store, t0 + 2 * HOUR)
    h = store.open_table("heads").history(1)[0]  # type: ignore[union-attr]
    assert int(h["lmat.users"]) == 3
    assert 3 <= int(h["lmat.latest_rows_read"]) <= 3 * heads.LATEST_ROW_GROUP < n_users
    _check_heads(store, 1)
    got = {r["user_id"]: r["head_len"] for r in read(store, "heads").to_pylist()
           if r["snapshot_id"] == 1}
    assert got == {7: 2, 9_001: 2, 19_999: 2}
    _latest_equals_heads(store)
    # forget rewrites heads_latest files in the same small row groups.
    forget_users(store, [9_001, 12])
    _latest_equals_heads(store)
    dt = store.open_table(heads.LATEST)
    assert dt is not None
    for path in dt.file_uris():
        md = pq.ParquetFile(path).metadata
        assert all(md.row_group(g).num_rows <= heads.LATEST_ROW_GROUP
                   for g in range(md.num_row_groups))
    assert not {9_001, 12} & set(read(store, heads.LATEST).column("user_id").to_pylist())


def test_fold_from_keeps_geometric_files() -> None:
    assert heads.fold_from(np.array([1000, 10, 10, 10])) == 1
    assert heads.fold_from(np.array([1000, 500, 250, 125, 60])) == 3  # the newest two
    assert heads.fold_from(np.array([5, 5])) == 0
    assert heads.fold_from(np.array([40, 30, 20, 10, 10])) == 0
    # Folded when files outnumber the limit, or the newer ones hold as much as the oldest.
    assert not heads.fold_due(np.array([1000])) and not heads.fold_due(np.array([1000, 999]))
    assert heads.fold_due(np.array([1000, 500, 500]))
    assert heads.fold_due(np.array([10**6] + [10] * heads.LATEST_FOLD_FILES))


def test_folds_keep_each_users_newest_summary(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "LATEST_FOLD_FILES", 3)
    monkeypatch.setattr(heads, "LATEST_ROW_GROUP", 8)
    rng = np.random.default_rng(5)
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    eid = 0
    t0 = 10 * HOUR
    folds = []
    for k in range(14):
        # Hours touching many users, then few (so that folds cover only the newest files).
        n = 300 if k < 3 else int(rng.integers(3, 20))
        u = rng.integers(1, 200 if k < 3 else 30, n).astype(np.int64)
        ats = t0 + k * HOUR + np.sort(rng.integers(0, HOUR, n))
        ets = ats - rng.integers(0, 3 * HOUR, n)
        ingest_files(store, [_events(tmp_path / f"e{k}.parquet", u, ets, ats, eid)])
        eid += n
        publish_snapshot(store, t0 + (k + 1) * HOUR)
        _check_heads(store, k)
        _latest_equals_heads(store)
        dt = store.open_table(heads.LATEST)
        assert dt is not None
        acts = pa.table(dt.get_add_actions(flatten=True))
        per_bucket = np.unique(acts.column("partition.bucket").to_numpy(), return_counts=True)[1]
        assert per_bucket.max() <= heads.LATEST_FOLD_FILES
        folds += [h["operationParameters"]["predicate"] for h in dt.history(3)
                  if h.get("lmat.op") == "fold_heads_latest"]
    # Folds happened, some of them of the newest files only (the oldest file outlived them).
    assert folds
    assert any(">= 0)" not in p for p in folds)
