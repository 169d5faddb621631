"""Length pushdown that reads less (issue 15, item 5): compaction cuts each bucket into stripes
by rank from each user's end, and a short tenant reads only the stripes its length reaches,
while every tenant's sequences stay exactly the spec's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.protocol.thin import write_thin
from lmat_platform.reconstruct import concat_sequences, iter_reconstruct
from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot, uih
from lmat_platform.tenants import Tenant
from tests.helpers import assert_matches, expected_outputs, read

HOUR = 3_600_000_000


def test_short_tenants_read_only_their_stripes(tmp_path: Path) -> None:
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
    compact_buckets(store, min_files=1)  # stripes at snapshot 0
    ingest_files(store, [str(tmp_path / "b.parquet")])
    publish_snapshot(store, 149 * HOUR)  # snapshot 1: a generation file on top of the stripes
    names = [f.path for f in uih.list_files(store.open_table("uih"))]
    assert sum("-s1-" in p for p in names) == 1 and sum("-s3-" in p for p in names) == 0

    # Requests at both snapshots, and before any (their heads are empty).
    T = np.r_[[120 * HOUR] * 8, [147 * HOUR] * 8, [150 * HOUR] * 8]
    req = pa.table({"request_id": np.arange(24, dtype=np.int64),
                    "user_id": np.tile(np.arange(1, 9, dtype=np.int64), 3), "request_ts": T})
    pq.write_table(req, tmp_path / "req.parquet")
    thin = str(tmp_path / "thin")
    write_thin(store, str(tmp_path / "req.parquet"), thin, path="examples")

    events = read(store, "raw").to_pylist()
    read_bytes = {}
    for L in (256, 2048, 16384):
        tenant = Tenant(name=f"L{L}", columns=("item_id", "event_ts"), max_len=L)
        parts = list(iter_reconstruct(store, thin, tenant))
        got = concat_sequences(parts, tenant.columns).to_table()
        assert_matches(got, expected_outputs(events, req.to_pylist(), tenant), label=f"L{L}")
        read_bytes[L] = sum(p.bytes_read for p in parts)
    # The 256 tenant skips the 257th.. stripes; 2048 reads the 257..2048 stripe too.
    assert read_bytes[256] * 4 <= read_bytes[2048], read_bytes
    assert read_bytes[2048] < read_bytes[16384], read_bytes
    # An action filter cannot use stripes (its last L may lie deeper): still exact.
    tenant = Tenant(name="acts", columns=("item_id",), max_len=256, actions=(2,))
    got = concat_sequences(list(iter_reconstruct(store, thin, tenant)), tenant.columns).to_table()
    assert_matches(got, expected_outputs(events, req.to_pylist(), tenant), label="acts")
