"""Rebuilding the accepted-id index (issue 15, item 1) from a raw log and a tier that overlap,
in more chunks than one: every accepted id once, in memory bounded by a chunk plus one row
group per sorted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmat_platform.store import idindex, ingest_files, init_store, publish_snapshot
from tests.helpers import read
from tests.test_scale_ingest import _batch, _index_ids


def test_merge_runs_drops_ids_shared_by_runs(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(idindex, "MAX_FILE_ROWS", 50)
    rng = np.random.default_rng(1)
    runs, first_user = [], {}
    for r in range(5):
        ids = np.unique(rng.integers(0, 400, 120))
        for i in ids.tolist():
            first_user.setdefault(i, r)
        path = str(tmp_path / f"r{r}.parquet")
        pq.write_table(pa.table({"event_id": ids, "user_id": np.full(len(ids), r, np.int64)}),
                       path, row_group_size=int(rng.integers(1, 30)))
        runs.append(path)
    chunks = list(idindex._merge_runs(runs))
    assert all(len(c[0]) == 50 for c in chunks[:-1]) and 0 < len(chunks[-1][0]) <= 50
    ids = np.concatenate([c[0] for c in chunks])
    users = np.concatenate([c[1] for c in chunks])
    assert np.array_equal(ids, np.array(sorted(first_user)))  # sorted, each id once
    assert users.tolist() == [first_user[i] for i in ids.tolist()]  # the earliest run's


def test_rebuild_of_overlapping_raw_and_tier_holds_each_id_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ingest_files(store, [_batch(tmp_path / "a.parquet", np.arange(0, 3000))])
    publish_snapshot(store, 10_000)  # the tier holds the raw log's events a second time
    ingest_files(store, [_batch(tmp_path / "b.parquet", np.arange(3000, 3500), ts0=20_000)])
    assert read(store, "raw").num_rows == 3500 and read(store, "uih").num_rows == 3000
    # Chunks of 1,000 ids (the old rebuild deduplicated only its last chunk), runs of
    # 128-id row groups.
    monkeypatch.setattr(idindex, "MAX_FILE_ROWS", 1000)
    monkeypatch.setattr(idindex, "ROW_GROUP_IDS", 128)
    assert idindex.rebuild(store) == 3500
    assert np.array_equal(_index_ids(store), np.arange(3500))
    ds = idindex.index_dataset(store)
    assert ds is not None
    t = ds.to_table()
    assert np.array_equal(np.sort(t.column("user_id").to_numpy()),
                          np.sort(np.arange(3500) % 97))
    # The rebuilt index answers the duplicate check.
    res = ingest_files(store, [_batch(tmp_path / "c.parquet", np.arange(3400, 3600), ts0=30_000)])
    assert (res.accepted, res.duplicates) == (100, 100)
