"""Retention of the summary tier's recurrent states (spec section 10).

``summary_state`` holds a row per (summarizer version, snapshot k, user touched by k); extending
a user's summary needs only their newest row. A row is **superseded** once the same version has
a newer row for the user. Superseded rows are kept for the store's retention (as the raw log
keeps a snapshot's events, :mod:`lmat_platform.store.retention`), then dropped: a row
``(v, k, u)`` goes when the user has a row ``(v, k', u)`` with ``k' > k`` whose snapshot's
summaries were registered (``created_at`` in ``summary_snapshots``) at least the retention ago.
So state bytes stay at one row per (version, user) plus the rows of the last retention window,
however many snapshots the tier holds. The summaries themselves are never pruned here: the
summary a past request was served must stay available to train on it.

:func:`prune_states` rewrites the files holding such rows in one commit (tagged ``lmat.op =
prune_summary_state``); a kill before it changes nothing, a re-run after it finds nothing to drop.
It runs in :func:`lmat_platform.store.deletion.vacuum` (with the store's retention) and needs
no torch.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.store.core import Store, as_store, delta_dataset, now_us
from lmat_platform.store.deletion import file_stats_json

log = logging.getLogger(__name__)

_KEYS = ["version", "snapshot_id", "user_id"]


def superseded_states(store: Store | str, *, retention_hours: int | None = None,
                      now: int | None = None) -> pa.Table:
    """``(version, snapshot_id, user_id)`` of the state rows :func:`prune_states` drops."""
    store = as_store(store)
    hours = store.config.retention_hours if retention_hours is None else retention_hours
    now = now_us() if now is None else now
    empty = pa.table({"version": pa.array([], pa.string()), "snapshot_id": pa.array([], pa.int32()),
                      "user_id": pa.array([], pa.int64())})
    st = store.open_table("summary_state")
    reg = store.read_table("summary_snapshots", columns=["version", "snapshot_id", "created_at"])
    if st is None or reg is None or reg.num_rows == 0:
        return empty
    old = reg.filter(pa.array(reg.column("created_at").to_numpy() <= now - hours * 3_600_000_000))
    if old.num_rows == 0:
        return empty
    rows = delta_dataset(st).to_table(columns=_KEYS)
    out = []
    for v in np.unique(rows.column("version").to_numpy(zero_copy_only=False)).tolist():
        mine = rows.filter(pa.array(rows.column("version").to_numpy(zero_copy_only=False) == v))
        ov = old.filter(pa.array(old.column("version").to_numpy(zero_copy_only=False) == v))
        if ov.num_rows == 0:
            continue
        s = mine.column("snapshot_id").to_numpy().astype(np.int64)
        u = mine.column("user_id").to_numpy()
        aged = np.isin(s, ov.column("snapshot_id").to_numpy().astype(np.int64))
        if not aged.any():
            continue
        # Each user's newest aged row; everything of theirs before it is superseded.
        au, as_ = u[aged], s[aged]
        order = np.lexsort((as_, au))
        au, as_ = au[order], as_[order]
        last = np.r_[au[1:] != au[:-1], True]
        users, newest = au[last], as_[last]
        at = np.searchsorted(users, u)
        atc = np.minimum(at, len(users) - 1)
        drop = (users[atc] == u) & (s < newest[atc])
        out.append(mine.filter(pa.array(drop)))
    return pa.concat_tables(out).cast(empty.schema) if out else empty


def prune_states(store: Store | str, *, retention_hours: int | None = None,
                 now: int | None = None) -> dict[str, int]:
    """Drop superseded state rows older than the retention (see the module docstring) in one
    commit; call under the store's write lock. Returns rows dropped, files rewritten and the
    rows kept."""
    store = as_store(store)
    out = {"rows_dropped": 0, "files_rewritten": 0, "rows_kept": 0}
    gone = superseded_states(store, retention_hours=retention_hours, now=now)
    dt = store.open_table("summary_state")
    if dt is None:
        return out
    if gone.num_rows == 0:
        out["rows_kept"] = delta_dataset(dt).count_rows()
        return out
    # A key per row: (version, snapshot, user) -> one int64 per version's rows.
    drop = {(v, int(s), int(u)) for v, s, u in zip(
        gone.column("version").to_pylist(), gone.column("snapshot_id").to_pylist(),
        gone.column("user_id").to_pylist(), strict=True)}
    schema = pa.schema(dt.schema().to_arrow())
    parts = list(dt.metadata().partition_columns)
    file_schema = pa.schema([f for f in schema if f.name not in parts])
    at = pa.table(dt.get_add_actions(flatten=True))
    fs, root = store.filesystem()
    base = f"{root}/summary_state"
    ts = now_us() // 1000
    actions: list[AddAction | RemoveAction] = []
    part_vals = [at.column(f"partition.{p}").to_pylist() for p in parts]
    for k, (rel, size) in enumerate(zip(at.column("path").to_pylist(),
                                        at.column("size_bytes").to_pylist(), strict=True)):
        pv = {p: (None if v[k] is None else str(v[k])) for p, v in zip(parts, part_vals,
                                                                        strict=True)}
        with fs.open_input_file(f"{base}/{rel}") as fh:
            keys = pq.read_table(fh, columns=_KEYS)
        rm = np.fromiter(((v, int(s), int(u)) in drop for v, s, u in zip(
            keys.column("version").to_pylist(), keys.column("snapshot_id").to_pylist(),
            keys.column("user_id").to_pylist(), strict=True)), dtype=bool, count=keys.num_rows)
        if not rm.any():
            out["rows_kept"] += keys.num_rows
            continue
        with fs.open_input_file(f"{base}/{rel}") as fh:
            t = pq.read_table(fh)
        t = t.filter(pa.array(~rm))
        out["rows_dropped"] += int(rm.sum())
        out["rows_kept"] += t.num_rows
        out["files_rewritten"] += 1
        if t.num_rows:
            t = t.cast(pa.schema([file_schema.field(c) if c in file_schema.names
                                  else t.schema.field(c) for c in t.column_names]))
            new = f"{os.path.dirname(rel)}/part-prune-{uuid.uuid4().hex}.parquet".lstrip("/")
            with fs.open_output_stream(f"{base}/{new}") as f:
                pq.write_table(t, f)
            nbytes = fs.get_file_info(f"{base}/{new}").size or 0
            actions.append(AddAction(new, nbytes, pv, ts, True, file_stats_json(t)))
        actions.append(RemoveAction(rel, True, ts, int(size), pv))
    if actions:
        dt.create_write_transaction(
            actions, "append", schema, partition_by=parts or None,
            commit_properties=CommitProperties(custom_metadata={
                "lmat.op": "prune_summary_state", "lmat.rows_dropped": str(out["rows_dropped"])}))
    log.info("summary states: %s", out)
    return out
