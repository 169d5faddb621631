"""One stored copy (spec section 3): the raw log keeps only the recent rest.

Every event a published snapshot holds is in the tier. Once a snapshot is older than the
store's retention (by its registration time, ``created_at``, against the wall clock), the raw
log drops the events it holds (``arrival_ts`` below its watermark): :func:`retire_raw`, run by
``vacuum``. The raw log's app transaction ``lmat-retire`` records the newest snapshot retired, so
:func:`retired_watermark` says below which arrival time the raw log no longer holds events.

Every reader of "all accepted events" (the batch path's tails, the fat-row baseline, checks)
reads :func:`accepted_events`: the tier's rows below the retired watermark and the raw log's from
it on. The two are disjoint and together hold every accepted event, so what any reader
materializes does not change. Deletion reaches both (they are both per-user tables), and the
duplicate check does not read the raw log (:mod:`lmat_platform.store.idindex`), so a re-sent
copy of a retired event is still a duplicate.

Crash safety: a retirement is one commit of the raw log (removes of whole files below the
watermark, rewrites of the files that straddle it), tagged with the app transaction; a kill
before it changes nothing, and a re-run after it does nothing.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.store.core import Store, delta_dataset, now_us
from lmat_platform.store.deletion import file_stats_json

log = logging.getLogger(__name__)

RETIRE_APP = "lmat-retire"
_DROP = ("source", "batch_id")


def retired_through(store: Store) -> int | None:
    """The newest snapshot whose events have left the raw log (None: none have)."""
    raw = store.shared_table("raw")
    return None if raw is None else raw.transaction_version(RETIRE_APP)


def retired_watermark(store: Store) -> int | None:
    """Raw log rows with ``arrival_ts`` below this are gone (they are in the tier)."""
    from lmat_platform.store.snapshots import list_snapshots

    k = retired_through(store)
    if k is None:
        return None
    snaps = {s.snapshot_id: s for s in list_snapshots(store)}
    return snaps[k].watermark if k in snaps else None


def retire_raw(store: Store, *, retention_hours: int | None = None,
               now: int | None = None) -> dict[str, int]:
    """Drop from the raw log every event of the newest snapshot registered at least the
    retention ago (and so of every earlier one); call under the store's write lock. Returns
    the snapshot retired through (-1: none), rows dropped and files rewritten."""
    from lmat_platform.store.snapshots import list_snapshots

    hours = store.config.retention_hours if retention_hours is None else retention_hours
    now = now_us() if now is None else now
    out = {"retired_through": -1, "rows_dropped": 0, "files_removed": 0, "files_rewritten": 0}
    raw = store.open_table("raw")
    if raw is None:
        return out
    old = [s for s in list_snapshots(store) if s.created_at <= now - hours * 3_600_000_000]
    done = raw.transaction_version(RETIRE_APP)
    if not old or (done is not None and done >= old[-1].snapshot_id):
        out["retired_through"] = -1 if done is None else done
        return out
    snap = old[-1]
    wm = snap.watermark
    t = pa.table(raw.get_add_actions(flatten=True))
    fs, root = store.filesystem()
    schema = pa.schema(raw.schema().to_arrow())
    actions: list[AddAction | RemoveAction] = []
    ts = now // 1000
    for path, size, lo, hi, n in zip(
        t.column("path").to_pylist(), t.column("size_bytes").to_pylist(),
        t.column("min.arrival_ts").to_pylist(), t.column("max.arrival_ts").to_pylist(),
        t.column("num_records").to_pylist(), strict=True,
    ):
        if lo is not None and lo >= wm:
            continue
        actions.append(RemoveAction(path, True, ts, size, {}))
        if hi is not None and hi < wm:
            out["files_removed"] += 1
            out["rows_dropped"] += int(n)
            continue
        with fs.open_input_file(f"{root}/raw/{path}") as fh:
            part = pq.read_table(fh)
        keep = part.column("arrival_ts").to_numpy() >= wm
        out["rows_dropped"] += int((~keep).sum())
        part = part.filter(pa.array(keep))
        out["files_rewritten"] += 1
        if part.num_rows:
            actions.append(_write_raw_file(store, part))
    props = CommitProperties(
        custom_metadata={"lmat.op": "retire", "lmat.snapshot_id": str(snap.snapshot_id),
                         "lmat.watermark": str(wm)},
        app_transactions=[Transaction(app_id=RETIRE_APP, version=snap.snapshot_id)],
    )
    raw.create_write_transaction(actions, "append", schema, commit_properties=props)
    out["retired_through"] = snap.snapshot_id
    log.info("raw log: retired snapshots through %d (%s)", snap.snapshot_id, out)
    return out


def _write_raw_file(store: Store, part: pa.Table) -> AddAction:
    fs, root = store.filesystem()
    rel = f"part-retired-{uuid.uuid4().hex}.parquet"
    full = f"{root}/raw/{rel}"
    with fs.open_output_stream(full) as out:
        pq.write_table(part, out, compression="snappy")
    size = fs.get_file_info(full).size or 0
    return AddAction(rel, size, {}, now_us() // 1000, True, file_stats_json(part))


def raw_range_dataset(store: Store, raw: DeltaTable, lo: int | None, hi: int | None
                      ) -> pads.Dataset:
    """The raw log's files whose arrival range (from the Delta log's statistics, no footer
    read) meets ``[lo, hi)``, as a dataset: publish and the tails read the recent rest of a
    log whose old files the retention has not dropped yet without opening them."""
    files = store.derived("raw", "arrival-ranges", _arrival_ranges) if raw is store.shared_table(
        "raw") else _arrival_ranges(raw)
    keep = [p for p, a, b in files if (hi is None or a is None or a < hi)
            and (lo is None or b is None or b >= lo)]
    fs, root = store.filesystem()
    schema = pa.schema(raw.schema().to_arrow())
    return pads.dataset([f"{root}/raw/{p}" for p in keep], schema=schema, format="parquet",
                        filesystem=fs)


def _arrival_ranges(raw: DeltaTable) -> list[tuple[str, int | None, int | None]]:
    t = pa.table(raw.get_add_actions(flatten=True))
    if t.num_rows == 0:
        return []
    return list(zip(t.column("path").to_pylist(), t.column("min.arrival_ts").to_pylist(),
                    t.column("max.arrival_ts").to_pylist(), strict=True))


def accepted_events(
    store: Store,
    *,
    users: np.ndarray | None = None,
    buckets: np.ndarray | None = None,
    lo: int | None = None,
    hi: int | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Every accepted event (of ``users``, in ``buckets``, with ``lo <= arrival_ts < hi``,
    each bound optional): the raw log's rows, and the tier's for arrivals the raw log has
    retired. ``columns`` None: the raw log's columns. Unordered."""
    raw = store.shared_table("raw")
    if raw is None:
        return pa.table({})
    schema = pa.schema(raw.schema().to_arrow())
    cols = list(schema.names) if columns is None else [c for c in columns if c in schema.names]

    def filt(a: int | None, b: int | None) -> pads.Expression | None:
        f = None
        for e in (
            pads.field("arrival_ts") >= a if a is not None else None,
            pads.field("arrival_ts") < b if b is not None else None,
            pads.field("bucket").isin(pa.array(np.unique(buckets).astype(np.int32)))
            if buckets is not None else None,
            pads.field("user_id").isin(pa.array(np.unique(users))) if users is not None else None,
        ):
            if e is not None:
                f = e if f is None else f & e
        return f

    rw = retired_watermark(store)
    raw_lo = lo if rw is None or (lo is not None and lo >= rw) else rw
    parts = [raw_range_dataset(store, raw, raw_lo, hi).to_table(columns=cols,
                                                                 filter=filt(raw_lo, hi))]
    if rw is not None and (lo is None or lo < rw):
        tier = store.shared_table("uih")
        if tier is not None:
            top = rw if hi is None else min(hi, rw)
            tds = delta_dataset(tier)
            have = [c for c in cols if c in tds.schema.names]
            t = tds.to_table(columns=have, filter=filt(lo, top))
            for c in cols:
                if c not in have:
                    t = t.append_column(c, pa.nulls(t.num_rows, schema.field(c).type))
            parts.append(t.select(cols).cast(parts[0].schema))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]
