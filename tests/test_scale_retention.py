"""One stored copy (issue 15, item 4; spec section 3): published events leave the raw log after
the retention, and nothing any reader materializes changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.fatrows import write_fat_rows
from lmat_platform.protocol.thin import write_thin
from lmat_platform.reconstruct import concat_sequences, iter_reconstruct
from lmat_platform.store import forget_users, list_snapshots
from lmat_platform.store.core import live_bytes
from lmat_platform.store.retention import accepted_events, retire_raw, retired_watermark
from lmat_platform.tenants import Tenant
from tests.conftest import SynthStore
from tests.helpers import read

TENANT = Tenant(name="all", columns=("event_id", "item_id", "action", "event_ts"), max_len=100_000)


def _materialize(store, thin: str) -> pa.Table:
    parts = list(iter_reconstruct(store, thin, TENANT))
    return concat_sequences(parts, TENANT.columns).to_table().sort_by("request_id")


def test_retired_raw_log_changes_nothing_a_reader_sees(
    synth_store: SynthStore, tmp_path: Path
) -> None:
    s = synth_store
    st = s.store
    before = {k: _materialize(st, t) for k, t in (("log", s.thin_log), ("batch", s.thin_batch))}
    all_before = accepted_events(st, columns=["event_id", "user_id", "arrival_ts"])
    fat_before = tmp_path / "fat-before.parquet"
    write_fat_rows(st, s.requests_all, TENANT, str(fat_before))
    raw_bytes = live_bytes(st)["raw"]

    snaps = list_snapshots(st)
    out = retire_raw(st, retention_hours=0)
    assert out["retired_through"] == snaps[-1].snapshot_id and out["rows_dropped"] > 0
    assert retired_watermark(st) == snaps[-1].watermark
    assert retire_raw(st, retention_hours=0)["rows_dropped"] == 0  # idempotent
    raw = read(st, "raw")
    assert raw.num_rows == 0 or raw.column("arrival_ts").to_numpy().min() >= snaps[-1].watermark
    assert live_bytes(st)["raw"] < raw_bytes / 4

    # Every accepted event is still there, once: the tier's below the watermark, raw's above.
    after = accepted_events(st, columns=["event_id", "user_id", "arrival_ts"])
    assert sorted(after.column("event_id").to_pylist()) == \
        sorted(all_before.column("event_id").to_pylist())
    # Thin rows written before, and batch-path rows written now (their tails come from the
    # tier's later snapshots), materialize exactly as before; so do fat rows.
    for k, t in (("log", s.thin_log), ("batch", s.thin_batch)):
        assert _materialize(st, t).equals(before[k]), k
    fresh = str(tmp_path / "thin-after")
    write_thin(st, s.requests_all, fresh, path="examples")
    assert _materialize(st, fresh).equals(before["batch"])
    fat_after = tmp_path / "fat-after.parquet"
    write_fat_rows(st, s.requests_all, TENANT, str(fat_after))
    assert pq.read_table(fat_after).equals(pq.read_table(fat_before))

    # Deletion still reaches the one copy: the user is gone from every reader's events.
    u = int(np.bincount(after.column("user_id").to_numpy()).argmax())
    forget_users(st, [u])
    assert u not in set(accepted_events(st, columns=["user_id"]).column("user_id").to_pylist())
