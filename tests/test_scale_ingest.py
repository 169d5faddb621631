"""The accepted-id index (issue 15, item 1): ingest's duplicate check reads what the batch can
hit, not the store; a kill between the raw commit and the index commit is caught up; the index
is merged by size class; ``forget`` reaches it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform.store import forget_users, idindex, ingest_files, init_store
from lmat_platform.store.core import Store
from tests.helpers import read


def _batch(path: Path, ids: np.ndarray, *, users: np.ndarray | None = None, ts0: int = 0) -> str:
    n = len(ids)
    users = users if users is not None else (ids % 97).astype(np.int64)
    ts = ts0 + np.arange(n, dtype=np.int64)
    pq.write_table(pa.table({
        "user_id": pa.array(users, pa.int64()),
        "event_id": pa.array(ids, pa.int64()),
        "event_ts": pa.array(ts, pa.int64()),
        "arrival_ts": pa.array(ts + 5, pa.int64()),
        "item_id": pa.array(np.ones(n, np.int64)),
        "action": pa.array(np.ones(n, np.int16)),
    }), path)
    return str(path)


def _index_ids(store: Store) -> np.ndarray:
    ds = idindex.index_dataset(store)
    assert ds is not None
    return np.sort(ds.to_table(columns=["event_id"]).column("event_id").to_numpy())


def _lookup(store: Store, ids: np.ndarray) -> tuple[np.ndarray, idindex.LookupStats]:
    st = idindex.LookupStats()
    return idindex.accepted_mask(store, ids, st), st


def test_duplicate_check_reads_only_what_the_batch_can_hit(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    per = 20_000
    reads = []
    for b in range(20):  # time-ordered ids: batch b holds [b*per, (b+1)*per)
        ids = np.arange(b * per, (b + 1) * per, dtype=np.int64)
        ingest_files(store, [_batch(tmp_path / f"b{b}.parquet", ids, ts0=b * per)])
        # A fresh batch of new ids plus 3 re-sent ids of the previous batch: whatever the store
        # holds, the check reads the row groups of those 3 ids and nothing else.
        q = np.r_[np.arange((b + 1) * per, (b + 2) * per), [b * per + 5, b * per + 9000,
                                                              (b + 1) * per - 1]]
        mask, st = _lookup(store, q)
        assert mask.sum() == 3 and mask[-3:].all()
        reads.append(st.row_groups_read)
    assert max(reads) <= 3, reads
    # Merged by size class: 20 batch files became few files, each sorted with narrow ranges.
    assert st.files < 20
    assert np.array_equal(_index_ids(store), np.arange(20 * per))


def test_unordered_ids_are_checked_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    pool = rng.choice(10**12, size=30_000, replace=False).astype(np.int64)
    for b in range(3):
        ingest_files(store, [_batch(tmp_path / f"b{b}.parquet", pool[b * 10_000:(b + 1) * 10_000])])
    q = np.r_[pool[::7], rng.integers(10**12, 2 * 10**12, 5000)]
    q = rng.permutation(q)
    mask, _ = _lookup(store, q)
    assert np.array_equal(mask, np.isin(q, pool))


def test_kill_between_raw_and_index_commit_is_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    a = _batch(tmp_path / "a.parquet", np.arange(0, 1000))
    b = _batch(tmp_path / "b.parquet", np.arange(500, 1500))

    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed after the raw commit")

    monkeypatch.setattr(idindex, "add_ids", die)
    with pytest.raises(KeyboardInterrupt):
        ingest_files(store, [a])
    monkeypatch.undo()
    assert read(store, "raw").num_rows == 1000  # the commit point landed
    assert idindex.index_dataset(store) is None  # the index did not
    # The next batch is checked against a caught-up index: its overlap is duplicates.
    res = ingest_files(store, [b])
    assert (res.accepted, res.duplicates) == (500, 500)
    # Re-running the killed batch finishes it with the counts of its first run.
    res = ingest_files(store, [a])
    assert (res.accepted, res.duplicates, res.skipped_files) == (1000, 0, 0)
    ids = read(store, "raw").column("event_id").to_numpy()
    assert len(ids) == len(np.unique(ids)) == 1500
    assert np.array_equal(_index_ids(store), np.arange(1500))
    rec = read(store, "ingests")
    assert sorted(rec.column("accepted").to_pylist()) == [500, 1000]


def test_store_without_index_is_indexed_from_its_raw_log(tmp_path: Path) -> None:
    import shutil

    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ingest_files(store, [_batch(tmp_path / "a.parquet", np.arange(0, 800))])
    shutil.rmtree(tmp_path / "s" / "ids")  # a store written before the index existed
    res = ingest_files(store, [_batch(tmp_path / "b.parquet", np.arange(700, 900))])
    assert (res.accepted, res.duplicates) == (100, 100)
    assert np.array_equal(_index_ids(store), np.arange(900))


def test_forget_removes_the_users_ids(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ids = np.arange(0, 400)
    users = np.where(ids % 2 == 0, 7, 8).astype(np.int64)
    ingest_files(store, [_batch(tmp_path / "a.parquet", ids, users=users)])
    forget_users(store, [7])
    assert np.array_equal(_index_ids(store), ids[ids % 2 == 1])
    # The forgotten user's events re-sent later are accepted as new (section 7).
    res = ingest_files(store, [_batch(tmp_path / "b.parquet", ids[:10], users=users[:10],
                                      ts0=10_000)])
    assert (res.accepted, res.duplicates) == (5, 5)


def test_vacuum_keeps_the_index_caught_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmat_platform.store import publish_snapshot, vacuum

    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64, retention_hours=0)
    ingest_files(store, [_batch(tmp_path / "a.parquet", np.arange(0, 600))])
    publish_snapshot(store, 10_000)
    vacuum(store)  # retires the raw log's published rows and expires its log entries
    assert read(store, "raw").num_rows == 0

    def no_rebuild(*args: object, **kwargs: object) -> int:
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(idindex, "rebuild", no_rebuild)
    res = ingest_files(store, [_batch(tmp_path / "b.parquet", np.arange(500, 700), ts0=20_000)])
    assert (res.accepted, res.duplicates) == (100, 100)  # retired ids are still duplicates
