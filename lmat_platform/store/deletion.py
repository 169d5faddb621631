"""Deletion (spec section 7): forgetting users, and vacuum after retention.

``forget_users`` removes every event of the users from the raw log, the quarantine, the UIH tier
(every snapshot at once: snapshots share the tier's files), the head summaries, and the tails of
every thin table registered by ``log``; each table changes in one commit tagged
``lmat.op = forget``. From then on every reader sees the deletion. The bytes stay on disk in
unreferenced files until :func:`vacuum` removes files older than the retention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.exceptions import LmatError
from lmat_platform.hashing import bucket_of
from lmat_platform.store import uih
from lmat_platform.store.cache import cache
from lmat_platform.store.core import Store, as_store, delta_dataset, now_us, storage_options

log = logging.getLogger(__name__)

DATA_TABLES = ("raw", "quarantine", "uih", "heads")


def _in_list(values: Sequence[int] | np.ndarray) -> str:
    return ", ".join(str(int(v)) for v in values)


def forget_users(store: Store | str, user_ids: Sequence[int]) -> dict[str, int]:
    """Forget users everywhere; returns rows removed per table."""
    store = as_store(store)
    users = np.unique(np.asarray(list(user_ids), dtype=np.int64))
    if len(users) == 0:
        raise LmatError("forget: give at least one --user")
    buckets = np.unique(bucket_of(users, store.n_buckets))
    pred_user = f"user_id IN ({_in_list(users)})"
    pred_bucket = f"bucket IN ({_in_list(buckets)})"
    props = CommitProperties(
        custom_metadata={"lmat.op": "forget", "lmat.users": str(len(users))}
    )
    removed: dict[str, int] = {}
    # Decoded tier data of this process may hold the users' events: drop it (the files that
    # held them are replaced below, so no later read would be served from it anyway).
    cache().clear()
    with store.write_lock():
        for name in DATA_TABLES:
            if name == "uih":
                removed[name] = _forget_in_tier(store, users, buckets)
                continue
            dt = store.open_table(name)
            if dt is None:
                removed[name] = 0
                continue
            pred = f"{pred_bucket} AND {pred_user}" if name == "heads" else pred_user
            metrics = dt.delete(pred, commit_properties=props)
            removed[name] = int(metrics.get("num_deleted_rows", 0))
        for uri in registered_thin_tables(store):
            removed[f"thin:{uri}"] = _purge_tails(uri, users, buckets, props)
        store.append(
            "forgotten",
            pa.table(
                {
                    "user_id": pa.array(users),
                    "forgotten_at": pa.array(np.full(len(users), now_us(), dtype=np.int64)),
                }
            ),
            op="forget",
        )
    log.info("forgot %d users: %s", len(users), removed)
    return removed


def _forget_in_tier(store: Store, users: np.ndarray, buckets: np.ndarray) -> int:
    """Remove the users' rows from the UIH tier in one commit tagged ``forget``, keeping its
    layout: each touched file is rewritten sorted, in row groups, by :func:`uih.write_files`.

    (A plain Delta delete would concatenate a bucket's files into one unsorted file, which
    breaks the sort order that :func:`uih.read_bucket` and its row-group pruning rely on.)
    """
    dt = store.open_table("uih")
    if dt is None:
        return 0
    fs, root = store.filesystem()
    actions: list[AddAction | RemoveAction] = []
    removed = 0
    ts = now_us() // 1000
    for f in uih.list_files(dt):
        if f.bucket not in buckets:
            continue
        if not uih.row_groups_for_users(uih.file_metadata(store, f.path), users):
            continue
        with fs.open_input_file(f"{root}/uih/{f.path}") as fh:
            t = pq.read_table(fh)
        gone = np.isin(t.column("user_id").to_numpy(), users)
        if not gone.any():
            continue
        removed += int(gone.sum())
        t = t.filter(pa.array(~gone))
        if t.num_rows:
            t = t.append_column("bucket", pa.array(np.full(t.num_rows, f.bucket, np.int32)))
            actions += uih.write_files(store, t, prefix=f"f-{f.max_snapshot or 0:06d}",
                                       data_change=True)
        actions.append(RemoveAction(f.path, True, ts, f.size, {"bucket": str(f.bucket)}))
    if actions:
        uih.commit(store, actions, pa.schema(dt.schema().to_arrow()),
                   op="forget", metadata={"users": len(users)})
    return removed


def _purge_tails(uri: str, users: np.ndarray, buckets: np.ndarray, props: CommitProperties) -> int:
    """Empty the tails of the users' rows in one thin table (one replace-where commit)."""
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import TableNotFoundError

    try:
        dt = DeltaTable(uri, storage_options=storage_options())
    except TableNotFoundError:
        return 0
    f = pads.field("bucket").isin(pa.array(buckets)) & pads.field("user_id").isin(pa.array(users))
    rows = delta_dataset(dt).to_table(filter=f)
    if rows.num_rows == 0:
        return 0
    streamed = pc.is_valid(rows.column("tail_len"))
    n_events = int(pc.sum(rows.column("tail_len")).as_py() or 0)
    rows = rows.set_column(
        rows.column_names.index("tail_len"), "tail_len",
        pc.if_else(streamed, pa.scalar(0, pa.int32()), rows.column("tail_len")),
    )
    for i, name in enumerate(rows.column_names):
        if name.startswith("tail_") and name != "tail_len":
            typ = rows.schema.field(name).type
            empty = pa.array([[] if v else None for v in streamed.to_pylist()], type=typ)
            rows = rows.set_column(i, name, empty)
    from lmat_platform.protocol.thin import ROW_ORDER, thin_writer_properties

    write_deltalake(
        dt,
        rows.sort_by([(c, "ascending") for c in ROW_ORDER]),
        mode="overwrite",
        predicate=f"bucket IN ({_in_list(buckets)}) AND user_id IN ({_in_list(users)})",
        commit_properties=props,
        writer_properties=thin_writer_properties(),
        storage_options=storage_options(),
    )
    return n_events


def forgotten_users(store: Store) -> np.ndarray:
    """Forgotten user ids, sorted and unique (derived once per version of the table)."""
    got = store.derived("forgotten", "users", forgotten_of)
    return got if got is not None else np.array([], dtype=np.int64)


def forgotten_of(dt: DeltaTable) -> np.ndarray:
    """The forgotten users of a version of the ``forgotten`` table, sorted and unique."""
    t = delta_dataset(dt).to_table(columns=["user_id"])
    return np.unique(t.column("user_id").to_numpy()).astype(np.int64)


def register_thin_table(store: Store, uri: str) -> None:
    """Remember a thin table whose tails hold events, so that ``forget`` can purge them."""
    if uri in registered_thin_tables(store):
        return
    store.append(
        "thin_tables",
        pa.table({"uri": [uri], "registered_at": pa.array([now_us()], pa.int64())}),
        op="register_thin",
    )


def registered_thin_tables(store: Store) -> list[str]:
    t = store.read_table("thin_tables", columns=["uri"])
    return sorted(set(t.column("uri").to_pylist())) if t is not None else []


def vacuum(store: Store | str, *, retention_hours: int | None = None) -> dict[str, int]:
    """Delete files no longer referenced and older than the retention, in every table."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    store = as_store(store)
    hours = store.config.retention_hours if retention_hours is None else retention_hours
    out: dict[str, int] = {}
    uris = [store.table_uri(n) for n in DATA_TABLES] + registered_thin_tables(store)
    with store.write_lock():
        for uri in uris:
            try:
                dt = DeltaTable(uri, storage_options=storage_options())
            except TableNotFoundError:
                continue
            files = dt.vacuum(
                retention_hours=hours, dry_run=False, enforce_retention_duration=False
            )
            out[uri] = len(files)
            _expire_log(dt, uri, hours)
    return out


def _expire_log(dt: DeltaTable, uri: str, hours: int) -> None:
    """Drop Delta log entries older than the retention, after a checkpoint.

    Old commits carry the statistics (user_id min/max) of files that held a forgotten user;
    removing the data files alone would leave those ids on disk. The table keeps the store's
    retention as its log and tombstone retention, so time travel reaches back that far.
    """
    from deltalake import DeltaTable

    want = f"interval {hours} hours"
    conf = dt.metadata().configuration
    if (conf.get("delta.logRetentionDuration") != want
            or conf.get("delta.deletedFileRetentionDuration") != want):
        dt.alter.set_table_properties({
            "delta.logRetentionDuration": want,
            "delta.deletedFileRetentionDuration": want,
        })
    dt = DeltaTable(uri, storage_options=storage_options())
    dt.create_checkpoint()
    dt.cleanup_metadata()
