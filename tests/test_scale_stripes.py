"""Length pushdown that reads less (issue 15, item 5): compaction cuts each bucket into stripes
by rank from each user's end, and a short tenant reads only the stripes its length reaches,
while every tenant's sequences stay exactly the spec's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform.protocol.thin import write_thin
from lmat_platform.reconstruct import concat_sequences, iter_reconstruct
from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot, uih
from lmat_platform.store.core import Store
from lmat_platform.tenants import Tenant
from tests.helpers import assert_matches, expected_outputs, read

HOUR = 3_600_000_000


def _store_with_late_snapshot(tmp_path: Path, **compact: int) -> tuple[Store, pa.Table, str]:
    """Most of a history published at snapshot 0 and compacted (``compact``: its options),
    the last hours at snapshot 1; thin rows of requests at both snapshots and before any."""
    rng = np.random.default_rng(5)
    store = init_store(str(tmp_path / "s"), n_buckets=1, row_group_rows=512)
    users = np.repeat(np.arange(1, 9, dtype=np.int64), [6000, 5000, 4000, 3000, 300, 40, 5, 1])
    n = len(users)
    ats = 100 * HOUR + np.sort(rng.integers(0, 48 * HOUR, n))
    ets = ats - rng.integers(0, 4 * HOUR, n)  # late events: order by event_ts is not arrival's
    ev = pa.table({"user_id": rng.permutation(users), "event_id": np.arange(n, dtype=np.int64),
                   "event_ts": ets, "arrival_ts": ats,
                   "item_id": rng.integers(1, 1000, n).astype(np.int64),
                   "action": rng.integers(1, 4, n).astype(np.int16)})
    half = ats < 146 * HOUR  # most of the history is compacted, the last hours are not
    pq.write_table(ev.filter(pa.array(half)), tmp_path / "a.parquet")
    pq.write_table(ev.filter(pa.array(~half)), tmp_path / "b.parquet")
    ingest_files(store, [str(tmp_path / "a.parquet")])
    publish_snapshot(store, 146 * HOUR)
    if "stripes_as_of" not in compact:
        compact_buckets(store, min_files=1)  # stripes at snapshot 0
    ingest_files(store, [str(tmp_path / "b.parquet")])
    publish_snapshot(store, 149 * HOUR)  # snapshot 1: a generation file on top of the stripes
    if "stripes_as_of" in compact:
        compact_buckets(store, min_files=1, **compact)  # both snapshots, in one compaction

    # Requests at both snapshots, and before any (their heads are empty).
    T = np.r_[[120 * HOUR] * 8, [147 * HOUR] * 8, [150 * HOUR] * 8]
    req = pa.table({"request_id": np.arange(24, dtype=np.int64),
                    "user_id": np.tile(np.arange(1, 9, dtype=np.int64), 3), "request_ts": T})
    pq.write_table(req, tmp_path / "req.parquet")
    thin = str(tmp_path / "thin")
    write_thin(store, str(tmp_path / "req.parquet"), thin, path="examples")
    return store, req, thin


def _read_bytes_exact(store: Store, req: pa.Table, thin: str) -> dict[int, int]:
    """Bytes each length reads (every sequence checked against the spec's)."""
    events = read(store, "raw").to_pylist()
    read_bytes = {}
    for L in (256, 2048, 16384):
        tenant = Tenant(name=f"L{L}", columns=("item_id", "event_ts"), max_len=L)
        parts = list(iter_reconstruct(store, thin, tenant))
        got = concat_sequences(parts, tenant.columns).to_table()
        assert_matches(got, expected_outputs(events, req.to_pylist(), tenant), label=f"L{L}")
        read_bytes[L] = sum(p.bytes_read for p in parts)
    # An action filter cannot use stripes (its last L may lie deeper): still exact.
    tenant = Tenant(name="acts", columns=("item_id",), max_len=256, actions=(2,))
    got = concat_sequences(list(iter_reconstruct(store, thin, tenant)), tenant.columns).to_table()
    assert_matches(got, expected_outputs(events, req.to_pylist(), tenant), label="acts")
    return read_bytes


def test_short_tenants_read_only_their_stripes(tmp_path: Path) -> None:
    store, req, thin = _store_with_late_snapshot(tmp_path)
    names = [f.path for f in uih.list_files(store.open_table("uih"))]
    assert sum("-s1-" in p for p in names) == 1 and sum("-s3-" in p for p in names) == 0
    read_bytes = _read_bytes_exact(store, req, thin)
    # The 256 tenant skips the 257th.. stripes; 2048 reads the 257..2048 stripe too.
    assert read_bytes[256] * 4 <= read_bytes[2048], read_bytes
    assert read_bytes[2048] < read_bytes[16384], read_bytes


def test_stripes_ranked_as_of_an_earlier_snapshot(tmp_path: Path) -> None:
    """A compaction after snapshot 1 that ranks as of snapshot 0: requests pointing at
    snapshot 0 skip the deeper stripes all the same, and snapshot 1's events (however late)
    are all in the first stripe; ranked as of the newest snapshot, they cannot skip them."""
    store, req, thin = _store_with_late_snapshot(tmp_path, stripes_as_of=0)
    files = uih.list_files(store.open_table("uih"))
    assert {f.path.split("/")[-1][:11] for f in files} == {
        "c-000000-s0", "c-000000-s1", "c-000000-s2"}
    assert all(f.max_snapshot == 0 for f in files if "-s0-" not in f.path)
    assert max(f.max_snapshot for f in files) == 1
    as_of = _read_bytes_exact(store, req, thin)
    assert as_of[256] * 4 <= as_of[2048], as_of

    newest, req, thin = _store_with_late_snapshot(tmp_path / "newest", stripes_as_of=1)
    assert as_of[256] * 3 <= 2 * _read_bytes_exact(newest, req, thin)[256]
    with pytest.raises(ValueError, match="stripes_as_of"):
        compact_buckets(newest, min_files=1, stripes_as_of=-1)
