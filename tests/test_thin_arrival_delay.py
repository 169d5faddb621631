"""Thin format 3: a streamed tail event's arrival time stored as its delay after its event time.

The streaming writer stores ``arrival_ts - event_ts`` in ``tail_arrival_delay`` (and null
``tail_arrival_ts`` lists); readers add ``event_ts`` back. These tests check the stored values
against the raw log, and that a tenant reading ``arrival_ts`` gets the same sequences from the
streaming path, the batch path, and streaming tables that mix formats 1, 2 and 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake

from lmat_platform.protocol.thin import TAIL_ARRIVAL_DELAY, TAIL_PREFIX, arrival_delay
from lmat_platform.reader import SequenceLoader
from lmat_platform.reconstruct import materialize, own_tails
from lmat_platform.store.core import delta_dataset
from lmat_platform.tenants import Tenant
from tests.helpers import read_delta
from tests.test_parity_property import loader_sequences, table_sequences

ARRIVALS = Tenant("arrivals", ("item_id", "arrival_ts", "event_ts"), 64)
ARRIVAL_ONLY = Tenant("arrival_only", ("arrival_ts",), 16)


def test_streaming_rows_store_each_arrival_as_its_delay(synth_store_ro) -> None:
    s = synth_store_ro
    rows = read_delta(s.thin_log)
    assert rows.column(TAIL_PREFIX + "arrival_ts").null_count == rows.num_rows
    delay = rows.column(TAIL_ARRIVAL_DELAY).combine_chunks()
    ev = rows.column(TAIL_PREFIX + "event_ts").combine_chunks()
    ids = rows.column(TAIL_PREFIX + "event_id").combine_chunks()
    assert delay.null_count == 0
    assert (pc.list_value_length(delay).to_numpy() == pc.list_value_length(ev).to_numpy()).all()
    d, e, i = (pc.list_flatten(a).to_numpy() for a in (delay, ev, ids))
    assert len(d) > 100 and (d >= 0).all()
    raw = read_delta(str(Path(s.store_path) / "raw"))
    arrival = dict(zip(raw.column("event_id").to_pylist(), raw.column("arrival_ts").to_pylist(),
                       strict=True))
    assert (e + d).tolist() == [arrival[x] for x in i.tolist()]
    # The batch path stores no tail at all.
    assert TAIL_ARRIVAL_DELAY not in read_delta(s.thin_batch).column_names
    # Delays byte-stream-split (their high bytes are zero); statistics for user_id alone.
    for f in sorted(Path(s.thin_log).rglob("*.parquet")):
        md = pq.read_metadata(f)
        cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i)
                for i in range(md.num_columns)}
        assert "BYTE_STREAM_SPLIT" in cols[TAIL_ARRIVAL_DELAY + ".list.element"].encodings
        assert {c for c, m in cols.items() if m.is_stats_set} == {"user_id"}


def test_arrival_delay_keeps_absolute_times_it_cannot_rebuild() -> None:
    t = pa.table({"event_ts": pa.array([5, None], pa.int64()), "arrival_ts": [7, 9]})
    assert arrival_delay(t) is None
    assert arrival_delay(t.slice(0, 1)).to_pylist() == [2]
    extreme = pa.table({"event_ts": [np.iinfo(np.int64).min], "arrival_ts": [np.iinfo(np.int64).max]})
    assert arrival_delay(extreme).to_pylist() == [-1]  # wraps; the reader's addition wraps back


def _sequences(store: str, thin: str, tenant: Tenant, out: Path) -> tuple[dict, dict]:
    path = str(out / f"{tenant.name}-{Path(thin).name}.parquet")
    materialize(store, thin, tenant, path)
    loader = SequenceLoader(store, thin, tenant=tenant, batch_size=64, max_unit_rows=40)
    return (table_sequences(pq.read_table(path), tenant.columns),
            loader_sequences(list(loader), tenant.columns))


def test_arrival_ts_reads_the_same_from_every_format(synth_store_ro, tmp_path: Path) -> None:
    """Streaming (format 3) == batch; and a streaming table mixing format 3 with format 1 (each
    row its own tail, absolute arrivals) and format 2 (shared tails, absolute arrivals) reads
    the same, through the loader and through materialize."""
    s = synth_store_ro
    store_schema = pa.schema(DeltaTable(str(Path(s.store_path) / "raw")).schema().to_arrow())
    t = delta_dataset(DeltaTable(s.thin_log)).to_table()
    desc = DeltaTable(s.thin_log).metadata().description
    # Format 2 as written before: the same shared tails with absolute arrival times.
    ev = t.column(TAIL_PREFIX + "event_ts").combine_chunks()
    delay = t.column(TAIL_ARRIVAL_DELAY).combine_chunks()
    absolute = pa.ListArray.from_arrays(
        ev.offsets, pc.add(pc.list_flatten(ev), pc.list_flatten(delay)))
    fmt2 = t.set_column(t.schema.get_field_index(TAIL_PREFIX + "arrival_ts"),
                        TAIL_PREFIX + "arrival_ts", absolute)
    fmt2 = fmt2.set_column(fmt2.schema.get_field_index(TAIL_ARRIVAL_DELAY), TAIL_ARRIVAL_DELAY,
                           pa.nulls(t.num_rows, delay.type))
    fmt1 = own_tails(t, store_schema)
    assert fmt1.column(TAIL_ARRIVAL_DELAY).null_count == t.num_rows
    users = t.column("user_id").to_numpy()
    mixed = str(tmp_path / "mixed")
    # Users by residue mod 3 in formats 1, 2 and 3: one bucket holds rows of all three, and
    # the format-2 and format-3 rows of a bucket are in separate files.
    for k, part in enumerate((fmt1, fmt2, t)):
        write_deltalake(mixed, part.filter(pa.array(users % 3 == k)), partition_by=["bucket"],
                        mode="append", description=desc)
    got = {p: _sequences(s.store_path, p, ARRIVALS, tmp_path)
           for p in (s.thin_log, s.thin_batch, mixed)}
    want = got[s.thin_batch][0]
    assert sum(len(v["arrival_ts"]) for v in want.values()) > 100
    for p, (mat, loaded) in got.items():
        assert mat == want, p
        assert loaded == want, p
    # A tenant reading arrival_ts without event_ts among its columns (the reader adds
    # event_ts back all the same).
    only = {p: _sequences(s.store_path, p, ARRIVAL_ONLY, tmp_path) for p in (s.thin_log, mixed)}
    ref = _sequences(s.store_path, s.thin_batch, ARRIVAL_ONLY, tmp_path)[0]
    for p, (mat, loaded) in only.items():
        assert mat == ref and loaded == ref, p
