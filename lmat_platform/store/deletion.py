"""Deletion (spec section 7): forgetting users, and vacuum after retention.

``forget_users`` works in three steps, each a commit (or a few), so that a forget killed at
any point is invisible to readers and finished by running it again::

    1. tombstone    forgotten/  user u -> pending      readers drop u from now on: none of u's
                                                      requests is served, so none of u's events
    2. deletion     the UIH tier (every snapshot: they share its files), every table of
                    USER_TABLES (raw log, quarantine, heads, accepted-id index, summary tier)
                    and PURGE_HOOKS, and u's rows (requests, pointers, tails) in every
                    registered thin table; one commit per table, tagged ``lmat.op = forget``
    3. completion   forgotten/  user u -> done          u is an ordinary user again: events
                                                      that arrive later are accepted and served

Every forget also finishes the deletions of earlier forgets that were killed (every pending
user), and re-running it adds no tombstone (the registry holds one row per user: steps 1 and 3
rewrite it, they do not append). Events ingested for a user while their forget is pending are
deleted when it completes: they arrived before the forget returned.

The bytes stay on disk in unreferenced files and in old log entries until :func:`vacuum`
removes files older than the retention and expires the log (commits and checkpoints whose
statistics or predicates name a forgotten user); only the tombstone registry keeps the ids.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.exceptions import LmatError
from lmat_platform.hashing import bucket_of
from lmat_platform.store import uih
from lmat_platform.store.cache import cache
from lmat_platform.store.core import (
    Store,
    as_store,
    checkpoint_if_due,
    delta_dataset,
    delta_folders,
    now_us,
    storage_options,
    uri_filesystem,
)
from lmat_platform.store.heads import LATEST_ROW_GROUP
from lmat_platform.store.thin_registry import (
    register_thin_table,
    registered_thin_tables,
    thin_parquet_options,
)

log = logging.getLogger(__name__)

#: The tombstone registry: ``user_id | forgotten_at | pending`` (one row per user; ``pending``
#: true from the tombstone until the physical deletion is done; null in registries written
#: before deletion had steps, which only held completed forgets).
REGISTRY = "forgotten"
#: Store tables with a ``user_id`` column whose rows of a forgotten user are deleted by
#: :func:`delete_user_rows`, each with the pyarrow writer options of its rewritten files (None:
#: pyarrow's defaults). The UIH tier is not here: it is rewritten in its own layout by
#: :func:`_forget_in_tier`. A new store-side table of per-user data (the summary tier) adds its
#: name here, or a function to :data:`PURGE_HOOKS` when it needs more than this; :func:`vacuum`
#: covers every Delta table under the store on its own.
USER_TABLES: dict[str, dict[str, Any] | None] = {
    "raw": None,
    "quarantine": None,
    "heads": None,
    # Each user's newest head summary (store/heads.py), what publish extends: its files keep
    # their row groups small (publish reads the touched users' row groups only).
    "heads_latest": {"row_group_size": LATEST_ROW_GROUP, "compression": "zstd"},
    # The summary tier (summaries/tier.py, SUMMARY_TABLES).
    "summaries": None,
    "summary_state": None,
    # The accepted-id index (store/idindex.py), rewritten as it writes its files.
    "ids": {"row_group_size": 16_384, "compression": "zstd", "use_dictionary": False,
            "column_encoding": {"event_id": "DELTA_BINARY_PACKED", "user_id": "PLAIN"}},
}
#: ``fn(store, users, buckets, commit_properties) -> {name: rows removed}``, called in step 2 for
#: per-store derived data that a plain delete cannot purge. Each must be idempotent (a re-run
#: of a killed forget calls it again) and commit with the given properties.
PURGE_HOOKS: list[Callable[[Store, np.ndarray, np.ndarray, CommitProperties], dict[str, int]]] = []

__all__ = [
    "PURGE_HOOKS",
    "USER_TABLES",
    "forget_users",
    "forgotten_of",
    "forgotten_users",
    "pending_of",
    "pending_users",
    "register_thin_table",
    "registered_thin_tables",
    "vacuum",
]


def _in_list(values: Sequence[int] | np.ndarray) -> str:
    return ", ".join(str(int(v)) for v in values)


# ------------------------------------------------------------------------- the registry


def _normalized(t: pa.Table | None) -> pa.Table:
    """The registry as ``user_id, forgotten_at, pending`` with one row per user (registries
    written before steps may repeat a user and lack ``pending``), sorted by user."""
    schema = pa.schema([("user_id", pa.int64()), ("forgotten_at", pa.int64()),
                        ("pending", pa.bool_())])
    if t is None or t.num_rows == 0:
        return schema.empty_table()
    n = t.num_rows
    pend = (pc.fill_null(t.column("pending"), False).to_numpy(zero_copy_only=False)
            if "pending" in t.column_names else np.zeros(n, dtype=bool))
    users = t.column("user_id").to_numpy()
    at = (pc.fill_null(t.column("forgotten_at"), 0).to_numpy()
          if "forgotten_at" in t.column_names else np.zeros(n, dtype=np.int64))
    u, inv = np.unique(users, return_inverse=True)
    p = np.zeros(len(u), dtype=bool)
    np.logical_or.at(p, inv, pend)
    a = np.zeros(len(u), dtype=np.int64)
    np.maximum.at(a, inv, at.astype(np.int64))
    return pa.table([pa.array(u.astype(np.int64)), pa.array(a), pa.array(p)], schema=schema)


def _registry(store: Store) -> pa.Table:
    return _normalized(store.read_table(REGISTRY))


def _write_registry(store: Store, table: pa.Table, *, op: str, users: int) -> None:
    """Replace the registry by ``table`` in one commit (it never grows by a re-run)."""
    existing = store.open_table(REGISTRY)
    write_deltalake(
        existing if existing is not None else store.table_uri(REGISTRY),
        table,
        mode="overwrite",
        schema_mode="merge",
        commit_properties=CommitProperties(
            custom_metadata={"lmat.op": op, "lmat.users": str(users)}),
        storage_options=storage_options(),
    )
    dt = store.open_table(REGISTRY)
    if dt is not None:
        checkpoint_if_due(dt)


def forgotten_users(store: Store) -> np.ndarray:
    """Every user with a tombstone (pending or done), sorted and unique."""
    got = store.derived(REGISTRY, "users", forgotten_of)
    return got if got is not None else np.array([], dtype=np.int64)


def pending_users(store: Store) -> np.ndarray:
    """Users whose forget has its tombstone but not yet its completion, sorted: readers serve
    none of their requests."""
    got = store.derived(REGISTRY, "pending", pending_of)
    return got if got is not None else np.array([], dtype=np.int64)


def forgotten_of(dt: DeltaTable) -> np.ndarray:
    """The users with a tombstone in a version of the registry, sorted and unique."""
    t = delta_dataset(dt).to_table(columns=["user_id"])
    return np.unique(t.column("user_id").to_numpy()).astype(np.int64)


def pending_of(dt: DeltaTable) -> np.ndarray:
    """The users whose forget is pending in a version of the registry, sorted and unique."""
    t = _normalized(delta_dataset(dt).to_table())
    return t.column("user_id").to_numpy()[t.column("pending").to_numpy(zero_copy_only=False)]


# ------------------------------------------------------------------------- forget


def forget_users(store: Store | str, user_ids: Sequence[int]) -> dict[str, int]:
    """Forget users everywhere (see the module docstring); returns rows removed per table
    (``thin:URI`` for thin tables). Also finishes every forget left pending by a kill."""
    store = as_store(store)
    users = np.unique(np.asarray(list(user_ids), dtype=np.int64))
    if len(users) == 0:
        raise LmatError("forget: give at least one --user")
    with store.write_lock():
        reg = _registry(store)
        ru = reg.column("user_id").to_numpy()
        was_pending = ru[reg.column("pending").to_numpy(zero_copy_only=False)]
        new = np.setdiff1d(users, was_pending)
        # 1. The tombstone: from this commit on, no reader serves these users.
        if len(new):
            reg = _upsert(reg, new, pending=True, at=now_us())
            _write_registry(store, reg, op="forget_tombstone", users=len(new))
        todo = np.union1d(users, was_pending)
        if len(todo) > len(users):
            log.info("finishing the pending forget of %d earlier user(s)",
                     len(todo) - len(users))
        # Decoded tier data of this process may hold the users' events: drop it (the files that
        # held them are replaced below, so no later read would be served from it anyway).
        cache().clear()
        # 2. The physical deletion, table by table (each step is a no-op when done before).
        removed = _purge(store, todo)
        # 3. Completion: the users are ordinary users again.
        reg = _registry(store)
        done = np.isin(reg.column("user_id").to_numpy(), todo)
        pend = reg.column("pending").to_numpy(zero_copy_only=False) & ~done
        reg = reg.set_column(2, "pending", pa.array(pend))
        _write_registry(store, reg, op="forget_done", users=len(todo))
    log.info("forgot %d user(s): %s", len(todo), removed)
    return removed


def _upsert(reg: pa.Table, users: np.ndarray, *, pending: bool, at: int) -> pa.Table:
    """The registry with ``users`` set to ``pending`` as of ``at`` (added if new)."""
    keep = reg.filter(pa.array(~np.isin(reg.column("user_id").to_numpy(), users)))
    add = pa.table([pa.array(users, pa.int64()), pa.array(np.full(len(users), at, np.int64)),
                    pa.array(np.full(len(users), pending))], schema=reg.schema)
    return pa.concat_tables([keep, add]).sort_by("user_id")


def _purge(store: Store, users: np.ndarray) -> dict[str, int]:
    """Step 2: delete every row of ``users`` from the store's tables and registered thin
    tables; idempotent (a table without such rows gets no commit)."""
    buckets = np.unique(bucket_of(users, store.n_buckets))
    props = CommitProperties(
        custom_metadata={"lmat.op": "forget", "lmat.users": str(len(users))}
    )
    removed: dict[str, int] = {}
    for name, options in USER_TABLES.items():
        removed[name] = delete_user_rows(store.table_uri(name), users, buckets, props,
                                         parquet_options=options)
    removed["uih"] = _forget_in_tier(store, users, buckets)
    for hook in PURGE_HOOKS:
        removed.update(hook(store, users, buckets, props))
    for uri in registered_thin_tables(store):
        removed[f"thin:{uri}"] = purge_thin_rows(uri, users, buckets, props)
    return removed


def purge_thin_rows(
    uri: str, users: np.ndarray, buckets: np.ndarray, props: CommitProperties
) -> int:
    """Delete the rows of ``users`` from one thin table: their requests, pointers and tails
    (a tail holds events of its row's own user only), rewritten as thin files are written."""
    return delete_user_rows(uri, users, buckets, props, parquet_options=thin_parquet_options)


def file_stats_json(t: pa.Table) -> str:
    """Delta file statistics: row count, null counts, min/max of the integer columns."""
    mins: dict[str, int] = {}
    maxs: dict[str, int] = {}
    nulls: dict[str, int] = {}
    for f, col in zip(t.schema, t.columns, strict=True):
        if pa.types.is_nested(f.type):
            continue
        nulls[f.name] = col.null_count
        if pa.types.is_integer(f.type) and len(col) > col.null_count:
            mm = pc.min_max(col)
            mins[f.name], maxs[f.name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": t.num_rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


def delete_user_rows(
    uri: str, users: np.ndarray, buckets: np.ndarray, props: CommitProperties, *,
    parquet_options: dict[str, Any] | Callable[[pa.Schema], dict[str, Any]] | None = None,
) -> int:
    """Delete every row of ``users`` (sorted; ``buckets`` theirs) from the Delta table at
    ``uri`` in one commit; returns the rows deleted (0, and no commit, when it holds none or
    does not exist).

    Each file that holds such rows (pruned by its ``bucket`` partition and ``user_id``
    statistics) is rewritten without them, rows in their order, with ``parquet_options`` (or
    those it returns for the file's schema), and
    typed as the table's schema. Unlike a Delta ``DELETE``, the commit records no predicate (the
    user ids stay out of the log), and the files keep the table's string types (delta-rs's
    delete writes ``string_view`` columns, which pyarrow's dataset filters then reject)."""
    from deltalake.exceptions import TableNotFoundError

    try:
        dt = DeltaTable(uri, storage_options=storage_options())
    except TableNotFoundError:
        return 0
    schema = pa.schema(dt.schema().to_arrow())
    if "user_id" not in schema.names:
        return 0
    parts = list(dt.metadata().partition_columns)
    at = pa.table(dt.get_add_actions(flatten=True))
    if not at.num_rows:
        return 0
    cand = np.ones(at.num_rows, dtype=bool)
    if "bucket" in parts:
        b = np.asarray([int(v) for v in at.column("partition.bucket").to_pylist()])
        cand &= np.isin(b, buckets)
    if "min.user_id" in at.column_names and "max.user_id" in at.column_names:
        lo = pc.fill_null(at.column("min.user_id"), np.iinfo(np.int64).min).to_numpy()
        hi = pc.fill_null(at.column("max.user_id"), np.iinfo(np.int64).max).to_numpy()
        # Some user lies in [lo, hi] when the first user >= lo is <= hi.
        i = np.searchsorted(users, lo, side="left")
        cand &= (i < len(users)) & (users[np.minimum(i, len(users) - 1)] <= hi)
    fs, root = uri_filesystem(uri)
    file_schema = pa.schema([f for f in schema if f.name not in parts])
    paths = at.column("path").to_pylist()
    sizes = at.column("size_bytes").to_pylist()
    part_vals = [at.column(f"partition.{p}").to_pylist() for p in parts]
    actions: list[AddAction | RemoveAction] = []
    removed = 0
    ts = now_us() // 1000
    for k in np.flatnonzero(cand).tolist():
        rel = paths[k]
        pv = {p: (None if v[k] is None else str(v[k])) for p, v in zip(parts, part_vals,
                                                                        strict=True)}
        with fs.open_input_file(f"{root}/{rel}") as fh:
            t = pq.read_table(fh)
        gone = np.isin(t.column("user_id").to_numpy(zero_copy_only=False), users)
        if not gone.any():
            continue
        removed += int(gone.sum())
        t = t.filter(pa.array(~gone))
        if t.num_rows:
            t = t.cast(pa.schema([file_schema.field(c) if c in file_schema.names
                                  else t.schema.field(c) for c in t.column_names]))
            new = f"{os.path.dirname(rel)}/part-forget-{uuid.uuid4().hex}.parquet".lstrip("/")
            with fs.open_output_stream(f"{root}/{new}") as out:
                opts = parquet_options(t.schema) if callable(parquet_options) else parquet_options
                pq.write_table(t, out, **(opts or {}))
            size = fs.get_file_info(f"{root}/{new}").size or 0
            actions.append(AddAction(new, size, pv, ts, True, file_stats_json(t)))
        actions.append(RemoveAction(rel, True, ts, int(sizes[k]), pv))
    if actions:
        dt.create_write_transaction(actions, "append", schema, partition_by=parts or None,
                                    commit_properties=props)
        checkpoint_if_due(DeltaTable(uri, storage_options=storage_options()))
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


# ------------------------------------------------------------------------- vacuum


def store_tables(store: Store) -> list[str]:
    """URIs of every Delta table under the store (whatever stage wrote it)."""
    return [store.table_uri(n) for n in delta_folders(store)]


def vacuum(store: Store | str, *, retention_hours: int | None = None) -> dict[str, int]:
    """Delete files no longer referenced and older than the retention, in every table of the
    store and every registered thin table, and expire their logs (see :func:`_expire_log`);
    returns files deleted per table URI."""
    from deltalake.exceptions import TableNotFoundError

    store = as_store(store)
    hours = store.config.retention_hours if retention_hours is None else retention_hours
    if hours < 0:
        raise LmatError(f"vacuum: --retention-hours must be >= 0, but got {hours}")
    out: dict[str, int] = {}
    with store.write_lock():
        from lmat_platform.store import idindex

        if retention_hours is None:
            # One stored copy (spec 3): snapshots older than the store's retention leave the
            # raw log first, so this vacuum removes their raw files too.
            from lmat_platform.store.retention import retire_raw

            retire_raw(store)
            if store.open_table("summary_state") is not None:
                # Superseded summarizer states past the retention go too (spec 10).
                from lmat_platform.summaries.retention import prune_states

                prune_states(store)
        # The accepted-id index follows the raw log's ingest commits; catch it up before
        # their log entries expire below (else the next ingest would have to rebuild it), and
        # mark the vacuum's own commits covered after.
        idindex.catch_up(store)
        uris = store_tables(store) + registered_thin_tables(store)
        for uri in uris:
            try:
                dt = DeltaTable(uri, storage_options=storage_options())
            except TableNotFoundError:
                continue
            # ``full``: every file the log does not reference, not only those it removed: a
            # writer killed before its commit (``lmat log`` to a new table, an ingest, a merge)
            # leaves files the log never named, with users' rows in them. Every writer writes
            # its files holding the store lock, which this holds: none is mid-write here.
            files = dt.vacuum(
                retention_hours=hours, dry_run=False, enforce_retention_duration=False,
                full=True,
            )
            out[uri] = len(files)
            _expire_log(uri, hours)
        idindex.cover_maintenance(store)
    return out


def _expire_log(uri: str, hours: int) -> None:
    """Drop Delta log entries older than the retention, after a checkpoint.

    Old commits carry the statistics (user_id min/max) of files that held a forgotten user,
    and a forget's delete commits carry its predicate (the user ids); removing the data files
    alone would leave those ids on disk. Old checkpoints go with the commits they replace. The
    table keeps the store's retention as its log and tombstone retention, so time travel reaches
    back that far. The checkpoint is written at a commit that names no data (a property change,
    when the newest commit is not one), because the checkpoint's own commit file stays.
    """
    dt = DeltaTable(uri, storage_options=storage_options())
    want = f"interval {hours} hours"
    conf = dt.metadata().configuration
    props = {"delta.logRetentionDuration": want, "delta.deletedFileRetentionDuration": want}
    last = dt.history(1)
    if any(conf.get(k) != v for k, v in props.items()) or (
        last and last[0].get("operation") not in ("SET TBLPROPERTIES", "VACUUM END")
    ):
        # (Setting the properties commits even when they are unchanged.)
        dt.alter.set_table_properties(props)
        dt = DeltaTable(uri, storage_options=storage_options())
    dt.create_checkpoint()
    dt.cleanup_metadata()
