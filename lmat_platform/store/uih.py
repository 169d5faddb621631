"""The immutable UIH tier: physical layout, writing generations, compaction, pruned reads.

Layout: a Delta table partitioned by ``bucket`` (a hash of ``user_id``). Every file is sorted by
``(user_id, event_ts, event_id)`` and written in row groups of ``row_group_rows`` rows, so a heavy
user's history spans whole row groups whose statistics (user range, time range, snapshot range)
let a reader skip what a tenant does not need. Each published snapshot appends one file per
bucket it touches (a *generation*); compaction merges a bucket's files into one sorted file in a
commit whose actions all carry ``dataChange = false`` (a layout-only rewrite).

Each row carries ``snapshot_id``, the snapshot that published it, so one read of a bucket at the
latest version serves every snapshot: the head of snapshot S is the rows with
``snapshot_id <= S``.

::

    uih/bucket=3/g-000007-<uuid>.parquet      rows of snapshot 7 for bucket 3, sorted
    uih/bucket=3/c-000009-s0-<uuid>.parquet   compaction of snapshots 0..9 for bucket 3:
    uih/bucket=3/c-000009-s1-<uuid>.parquet   one file per stripe (each user's last 256
                                              events, the 257th..2048th last, ...)

"""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.engines import Engine, LocalEngine
from lmat_platform.engines.files import commit_adds, commit_properties, split_by
from lmat_platform.kernels import is_sorted3, merge_sorted_runs, row_groups_wanted
from lmat_platform.store.cache import cache, scoped
from lmat_platform.store.core import Store, now_us

log = logging.getLogger(__name__)

SORT_KEYS = ["user_id", "event_ts", "event_id"]
STAT_COLUMNS = ("user_id", "event_ts", "event_id", "arrival_ts", "item_id", "action", "snapshot_id")
COMPRESSION = "lz4"
#: Columns written without a dictionary: nearly every value distinct, so a row group's
#: dictionary is the column again plus an index per row. Plain pages are smaller (the
#: standard workload's first stripes 4.8 -> 4.0 MB) and decode faster (a short tenant's
#: cache-off tier read about 15-20% less CPU).
NO_DICTIONARY = ("event_id", "event_ts", "arrival_ts", "dwell_ms")


@dataclass(frozen=True)
class TierFile:
    """One live data file of the tier, with the statistics a reader prunes by."""

    path: str  # relative to the table root
    bucket: int
    size: int
    rows: int
    min_ts: int | None
    max_ts: int | None
    max_snapshot: int | None
    min_snapshot: int | None


def sort_events(table: pa.Table) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in SORT_KEYS])


def _stats_json(t: pa.Table) -> str:
    mins, maxs, nulls = {}, {}, {}
    for c in t.column_names:
        col = t.column(c)
        nulls[c] = col.null_count
        if c in STAT_COLUMNS and len(col) > col.null_count:
            mm = pc.min_max(col)
            mins[c] = mm["min"].as_py()
            maxs[c] = mm["max"].as_py()
    return json.dumps(
        {"numRecords": t.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )


def write_files(
    store: Store, table: pa.Table, *, prefix: str, data_change: bool, engine: Engine | None = None,
    row_group_rows: int | None = None,
) -> list[AddAction]:
    """Write ``table`` (with a ``bucket`` column) as one sorted file per bucket; return the adds.

    The files are not visible to anyone until the adds are committed. ``engine``: where each
    bucket's file is written (:mod:`lmat_platform.engines`; None: in this process).
    ``row_group_rows``: rows per row group (None: the store's).
    """
    rg = row_group_rows or store.config.row_group_rows
    items = [(store, b, part.drop_columns(["bucket"]), prefix, data_change, rg)
             for b, part in split_by(table, "bucket")]
    return (engine or LocalEngine()).map(_write_bucket, items)


def _write_bucket(item: tuple[Store, int, pa.Table, str, bool, int]) -> AddAction:
    """One bucket's rows as one sorted file (a task of any engine)."""
    store, b, part, prefix, data_change, rg = item
    fs, root = store.filesystem()
    part = sort_events(part)
    rel = f"bucket={b}/{prefix}-{uuid.uuid4().hex}.parquet"
    full = f"{root}/uih/{rel}"
    fs.create_dir(f"{root}/uih/bucket={b}", recursive=True)
    with fs.open_output_stream(full) as out:
        pq.write_table(
            part,
            out,
            row_group_size=rg,
            compression=COMPRESSION,
            write_statistics=True,
            use_dictionary=[c for c in part.column_names if c not in NO_DICTIONARY],
        )
    size = fs.get_file_info(full).size or 0
    return AddAction(rel, size, {"bucket": str(b)}, now_us() // 1000, data_change,
                     _stats_json(part))


def commit(
    store: Store,
    actions: Sequence[AddAction | RemoveAction],
    schema: pa.Schema,
    *,
    op: str,
    metadata: dict[str, object],
    txn: tuple[str, int] | None = None,
) -> int:
    """Commit add/remove actions to the tier in one Delta commit; returns the new version."""
    dt = store.open_table("uih")
    return commit_adds(dt if dt is not None else store.table_uri("uih"), actions, schema,
                       partition_by=["bucket"],
                       props=commit_properties(op, metadata, txn)).version()


def tier_schema(events: pa.Schema) -> pa.Schema:
    """Tier columns: the event columns and traits, ``snapshot_id``, and the partition column."""
    fields = [f for f in events if f.name not in ("bucket", "source", "batch_id", "snapshot_id")]
    return pa.schema([*fields, pa.field("snapshot_id", pa.int32()), pa.field("bucket", pa.int32())])


def list_files(dt: DeltaTable) -> list[TierFile]:
    """Live files of the tier at ``dt``'s version, with their statistics."""
    t = pa.table(dt.get_add_actions(flatten=True))
    cols = set(t.column_names)

    def col(name: str) -> list:
        return t.column(name).to_pylist() if name in cols else [None] * t.num_rows

    return [
        TierFile(p, int(b), int(s), int(n), lo, hi, ms, mns)
        for p, b, s, n, lo, hi, ms, mns in zip(
            col("path"),
            col("partition.bucket"),
            col("size_bytes"),
            col("num_records"),
            col("min.event_ts"),
            col("max.event_ts"),
            col("max.snapshot_id"),
            col("min.snapshot_id"),
            strict=True,
        )
    ]


@functools.lru_cache(maxsize=4096)
def _parquet_metadata(uri: str, root_key: str) -> pq.FileMetaData:
    del root_key  # part of the cache key only
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def file_metadata(store: Store, rel: str) -> pq.FileMetaData:
    """Parquet footer of a tier file (cached: tier files are immutable)."""
    _, root = store.filesystem()
    uri = f"{root}/uih/{rel}" if store.is_local else f"{store.root}/uih/{rel}"
    return _parquet_metadata(uri, store.store_id)


def compact_buckets(
    store: Store, *, buckets: Sequence[int] | None = None, min_files: int = 2,
    engine: Engine | None = None, stripes_as_of: int | None = None,
) -> dict[str, int]:
    """Merge each bucket's tier files into one sorted file (a layout-only rewrite), and bin-pack
    the head summaries (one small file per bucket and snapshot otherwise, which readers open
    once per bucket and pass).

    ``stripes_as_of``: rank each user's events for the stripes (:func:`_write_stripes`) as of
    this snapshot rather than the newest: events of later snapshots all go to the first stripe
    (which every tenant reads), and the other stripes are skippable for every request that
    points at this snapshot or a later one (:func:`stripe_skippable`). A store compacted while
    training data logged since an earlier snapshot is still read passes the oldest snapshot
    those thin rows point at (the loader's ``info.snap_min``), so that their short tenants
    read the last events only; None: the newest snapshot in the buckets compacted.

    Every add and remove of the tier is committed with ``dataChange = false`` and the row counts
    in and out must match, which :func:`lmat_platform.validate.check_uih_commits` verifies.
    """
    with store.write_lock():
        out = _compact_tier(store, buckets=buckets, min_files=min_files, engine=engine,
                            stripes_as_of=stripes_as_of)
        heads = store.open_table("heads")
        if heads is not None:
            out["heads_files_removed"] = _compact_heads(store, heads)
    return out


def _compact_heads(store: Store, dt: DeltaTable) -> int:
    """Each bucket's head-summary files merged into one, sorted by (user_id, snapshot_id), in
    one layout-only commit (``dataChange = false``); returns the files removed. Readers load a
    bucket's summaries whole each pass they read it without the decoded cache
    (:meth:`HeadIndex.of_files`), and take a sorted file as it is (Delta's own ``optimize``
    concatenates the files unsorted: every such load sorted them again)."""
    from lmat_platform.engines.files import merge_bucket_files

    _, out = merge_bucket_files(dt, store.table_uri("heads"), order=("user_id", "snapshot_id"),
                                options=lambda _schema: {"compression": "zstd"}, min_files=2,
                                op="compact", error=RuntimeError)
    return out["files_in"]


def _compact_tier(
    store: Store, *, buckets: Sequence[int] | None, min_files: int, engine: Engine | None = None,
    stripes_as_of: int | None = None,
) -> dict[str, int]:
    dt = store.open_table("uih")
    if dt is None:
        return {"buckets": 0, "files_in": 0, "files_out": 0}
    files = list_files(dt)
    by_bucket: dict[int, list[TierFile]] = {}
    for f in files:
        by_bucket.setdefault(f.bucket, []).append(f)
    want = set(buckets) if buckets is not None else set(by_bucket)
    chosen = [(b, fl) for b, fl in sorted(by_bucket.items())
              if b in want and _units(fl) >= min_files]
    # Stripe names carry the highest snapshot of the buckets compacted so far, in bucket order.
    snaps = np.maximum.accumulate(
        np.array([max((f.max_snapshot or 0) for f in fl) for _, fl in chosen], dtype=np.int64))
    if stripes_as_of is not None:
        if stripes_as_of < 0:
            raise ValueError(f"stripes_as_of must be a snapshot id >= 0, but got {stripes_as_of}")
        snaps = np.full(len(chosen), stripes_as_of, dtype=np.int64)
    # One task per bucket: read, merge, cut into stripes, write (engine: where).
    per_bucket = (engine or LocalEngine()).map(
        _compact_bucket, [(store, b, fl, int(m)) for (b, fl), m in zip(chosen, snaps, strict=True)])
    ts = now_us() // 1000
    actions: list[AddAction | RemoveAction] = []
    for (b, fl), adds in zip(chosen, per_bucket, strict=True):
        actions += adds
        actions += [RemoveAction(f.path, False, ts, f.size, {"bucket": str(b)}) for f in fl]
    files_in = sum(len(fl) for _, fl in chosen)
    if not actions:
        return {"buckets": 0, "files_in": 0, "files_out": 0}
    n_out = sum(1 for a in actions if isinstance(a, AddAction))
    version = commit(
        store,
        actions,
        pa.schema(dt.schema().to_arrow()),
        op="compact",
        metadata={"files_in": files_in, "files_out": n_out},
    )
    log.info("compacted %d files into %d (tier version %d)", files_in, n_out, version)
    return {"buckets": n_out, "files_in": files_in, "files_out": n_out, "version": version}


def _compact_bucket(item: tuple[Store, int, list[TierFile], int]) -> list[AddAction]:
    """One bucket's tier files merged and written as stripes (a task of any engine)."""
    store, b, fl, max_snap = item
    fs, root = store.filesystem()
    parts = []
    for f in fl:
        with fs.open_input_file(f"{root}/uih/{f.path}") as fh:
            parts.append(pq.read_table(fh))
    merged = pa.concat_tables(parts, promote_options="default")
    rows_in = sum(f.rows for f in fl)
    if merged.num_rows != rows_in:
        raise RuntimeError(f"bucket {b}: read {merged.num_rows} rows, log says {rows_in}")
    merged = merged.append_column("bucket", pa.array(np.full(merged.num_rows, b, dtype=np.int32)))
    return _write_stripes(store, merged, max_snap)


def _units(files: list[TierFile]) -> int:
    """Files of a bucket as compaction counts them: the stripes of one compaction are one."""
    stripes = {m.group(1) for f in files if (m := _STRIPE_NAME.search(f.path))}
    return len(stripes) + sum(1 for f in files if not _STRIPE_NAME.search(f.path))


def _write_stripes(store: Store, merged: pa.Table, max_snap: int) -> list[AddAction]:
    """A bucket's compacted rows as one file per *stripe*: each user's last 256 events, the
    257th..2048th last, the 2049th..16384th last, then the rest (:data:`STRIPES`), ranked
    among the user's events of snapshots up to ``max_snap`` (events of later snapshots: all in
    the first stripe), each file sorted by (user_id, event_ts, event_id). A tenant whose
    ``max_len`` fits in the stripes before one never reads that stripe's file for requests at
    or after snapshot ``max_snap`` (:func:`stripe_skippable`), however its row groups mix
    users."""
    merged = sort_events(merged)
    u = merged.column("user_id").to_numpy()
    n = len(u)
    if n == 0:
        return []
    stripe = np.zeros(n, dtype=np.int64)
    old = merged.column("snapshot_id").to_numpy(zero_copy_only=False) <= max_snap
    uo = u[old]  # still sorted: a subsequence
    ends = np.searchsorted(uo, uo, side="right")
    rank = ends - np.arange(len(uo))  # 1 = the user's last event at snapshot max_snap
    stripe[old] = np.searchsorted(np.array(STRIPES), rank, side="left")
    adds: list[AddAction] = []
    for s_ in np.unique(stripe).tolist():
        part = merged.filter(pa.array(stripe == s_))
        # The first stripe in smaller row groups: a short tenant reads a row group for each
        # user it serves, so its bytes follow the row group's size, not the user's history.
        rg = min(store.config.row_group_rows, 4 * STRIPES[0]) if s_ == 0 else None
        adds += write_files(store, part, prefix=f"c-{max_snap:06d}-s{s_}", data_change=False,
                            row_group_rows=rg)
    return adds


#: Compacted files are cut into stripes by rank from each user's end: stripe ``s`` holds the
#: events ranked ``STRIPES[s-1] + 1 .. STRIPES[s]`` from the user's last (stripe 0: the last
#: ``STRIPES[0]``; the final stripe: the rest).
STRIPES = (256, 2048, 16384)
_STRIPE_NAME = re.compile(r"(?:^|/)c-(\d{6})-s(\d)-")


def stripe_skippable(f: TierFile, max_len: int, min_snapshot: int) -> bool:
    """Whether a tenant of ``max_len`` without an action filter can skip file ``f`` for
    requests whose snapshots are all at least ``min_snapshot``: ``f`` is a stripe of a
    compaction at snapshot K <= ``min_snapshot`` holding only events ranked beyond
    ``max_len`` from their user's end at K. Later events only push those further back (the
    last L of a later head are among the last L at K and the newer events), so none of them
    can be among a request's last ``max_len``."""
    m = _STRIPE_NAME.search(f.path)
    if m is None:
        return False
    k, s = int(m.group(1)), int(m.group(2))
    return s >= 1 and k <= min_snapshot and max_len <= STRIPES[s - 1]


@dataclass(frozen=True)
class RowGroupStats:
    """Per row group: rows and min/max of user_id, event_ts and snapshot_id."""

    rows: np.ndarray
    umin: np.ndarray
    umax: np.ndarray
    tmax: np.ndarray
    smin: np.ndarray


@functools.lru_cache(maxsize=4096)
def _rg_stats_cached(md_id: int, md: pq.FileMetaData) -> RowGroupStats:
    del md_id
    names = md.schema.to_arrow_schema().names
    iu, it, isn = names.index("user_id"), names.index("event_ts"), names.index("snapshot_id")
    n = md.num_row_groups
    out = {k: np.zeros(n, dtype=np.int64) for k in ("rows", "umin", "umax", "tmax", "smin")}
    for i in range(n):
        rg = md.row_group(i)
        out["rows"][i] = rg.num_rows
        su, st, ss = rg.column(iu).statistics, rg.column(it).statistics, rg.column(isn).statistics
        out["umin"][i] = su.min if su is not None and su.has_min_max else np.iinfo(np.int64).min
        out["umax"][i] = su.max if su is not None and su.has_min_max else np.iinfo(np.int64).max
        out["tmax"][i] = st.max if st is not None and st.has_min_max else np.iinfo(np.int64).max
        out["smin"][i] = ss.min if ss is not None and ss.has_min_max else 0
    return RowGroupStats(**out)


@functools.lru_cache(maxsize=4096)
def _arrow_names(md_id: int, md: pq.FileMetaData) -> tuple[str, ...]:
    del md_id
    return tuple(md.schema.to_arrow_schema().names)


@functools.lru_cache(maxsize=4096)
def _compressed_sizes(md_id: int, md: pq.FileMetaData, idx: tuple[int, ...]) -> np.ndarray:
    """Compressed bytes of columns ``idx`` in each row group of a file (from its footer)."""
    del md_id
    return np.array([sum(md.row_group(g).column(j).total_compressed_size for j in idx)
                     for g in range(md.num_row_groups)], dtype=np.int64)


def row_group_stats(md: pq.FileMetaData) -> RowGroupStats:
    return _rg_stats_cached(id(md), md)


def row_groups_for_users(md: pq.FileMetaData, users: np.ndarray) -> list[int]:
    """Row groups whose user range holds at least one of ``users`` (sorted)."""
    st = row_group_stats(md)
    i0 = np.searchsorted(users, st.umin, side="left")
    i1 = np.searchsorted(users, st.umax, side="right")
    return np.flatnonzero(i1 > i0).tolist()


def read_user_row_groups(
    store: Store, files: Sequence[TierFile], users: np.ndarray, columns: Sequence[str]
) -> list[pa.Table]:
    """``columns`` of the row groups of ``files`` whose user range holds one of ``users``
    (sorted), one table per file read; rows are not filtered (callers keep what they need)."""
    chunks: list[pa.Table] = []
    fs, root = store.filesystem()
    for f in files:
        md = file_metadata(store, f.path)
        rgs = row_groups_for_users(md, users)
        if not rgs:
            continue
        with fs.open_input_file(f"{root}/uih/{f.path}") as fh:
            chunks.append(pq.ParquetFile(fh, metadata=md).read_row_groups(rgs, columns=columns))
    return chunks


def _row_groups_wanted(
    st: RowGroupStats, users: np.ndarray, cutoffs: np.ndarray, max_snapshot: int,
    min_ts: int | None,
) -> list[int]:
    """Row groups holding one of ``users`` (sorted) with a row the read can need: not every
    row of a newer snapshot than ``max_snapshot``, nor older than every cutoff of the users it
    holds (nor than ``min_ts``). Compiled: no Python step per row group."""
    return row_groups_wanted(st.umin, st.umax, st.tmax, st.smin, users, cutoffs, max_snapshot,
                             min_ts).tolist()


@dataclass
class BucketRead:
    """Rows of one bucket a tenant needs, sorted by (user_id, event_ts, event_id)."""

    table: pa.Table
    bytes_read: int
    row_groups_read: int
    row_groups_skipped: int


def read_bucket(
    store: Store,
    files: Sequence[TierFile],
    *,
    users: np.ndarray,
    cutoffs: np.ndarray,
    columns: Sequence[str],
    actions: np.ndarray | None,
    max_snapshot: int,
    min_ts: int | None = None,
    schema: pa.Schema | None = None,
    exact: bool = True,
) -> BucketRead:
    """Read what a tenant needs of one bucket, pushing every restriction into the read.

    ``users`` are sorted and ``cutoffs[i]`` is the earliest ``event_ts`` user ``users[i]`` can
    need (the tenant's length marker; ``int64 min`` for all). Row groups are skipped by user
    range, by time (a row group whose newest event is older than every cutoff of the users it
    holds), by snapshot, and by ``min_ts`` (the tenant's window); only ``columns`` are decoded.
    Rows are then filtered exactly (user, cutoff, action, snapshot) with numpy; with
    ``exact=False`` only by action, for a caller that finds each user's rows and applies the
    cutoffs and snapshots itself (the reconstruction kernel): the rows of the row groups read
    then come back as one array per column, copied once.
    """
    keys = ["user_id", "event_ts", "event_id", "snapshot_id"]
    cols = list(dict.fromkeys([*keys, *columns, *(["action"] if actions is not None else [])]))
    chunks: list[pa.Table] = []
    nbytes = 0
    n_read = 0
    n_skip = 0
    if len(users) == 0:
        files = []
    # Which row groups of which files: pruned from the footers alone.
    reads: list[tuple[TierFile, pq.FileMetaData, list[int], list[str]]] = []
    for f in files:
        if f.min_snapshot is not None and f.min_snapshot > max_snapshot:
            continue
        md = file_metadata(store, f.path)
        st = row_group_stats(md)
        want = _row_groups_wanted(st, users, cutoffs, max_snapshot, min_ts)
        n_skip += len(st.rows) - len(want)
        if not want:
            continue
        schema_names = _arrow_names(id(md), md)
        present = [c for c in cols if c in schema_names]
        sizes = _compressed_sizes(id(md), md, tuple(schema_names.index(c) for c in present))
        nbytes += int(sizes[want].sum())
        n_read += len(want)
        reads.append((f, md, want, present))
    dc = cache()
    key: tuple[Any, ...] | None = None
    if not exact and reads:
        # The rows of a set of row groups, assembled (one array per column, action-filtered,
        # sorted), are as immutable as the files: kept, a later read of the same row groups
        # (the next pass, a slice of the same bucket) is served without copying them again.
        key = ("tier-read", store.store_id,
               tuple((f.path, f.size, tuple(w)) for f, _, w, _ in reads), tuple(cols),
               None if actions is None else tuple(np.unique(actions).tolist()))
        hit = dc.get(key)
        if hit is not None:
            return BucketRead(hit, nbytes, n_read, n_skip)
    for f, md, want, present in reads:
        t = _read_row_groups(store, f, want, present, md)
        for c in cols:
            if c not in present:
                typ = schema.field(c).type if schema is not None and c in schema.names else None
                t = t.append_column(c, pa.nulls(t.num_rows, typ))
        chunks.append(t.select(cols))
    if not chunks:
        def typ(c: str) -> pa.DataType:
            if schema is not None and c in schema.names:
                return schema.field(c).type
            return pa.int32() if c == "snapshot_id" else pa.int64()

        empty = {c: pa.array([], typ(c)) for c in cols}
        return BucketRead(pa.table(empty), nbytes, n_read, n_skip)
    t = chunks[0] if len(chunks) == 1 else _merge_files(
        pa.concat_tables(chunks, promote_options="permissive"), [c.num_rows for c in chunks])
    if not exact:
        t = t.combine_chunks()
        if actions is not None:
            keep_a = np.isin(t.column("action").to_numpy(zero_copy_only=False), actions)
            if not keep_a.all():
                t = t.filter(pa.array(keep_a))
        if not _is_sorted(t):
            t = sort_events(t)
        if key is not None:
            dc.put(key, t, t.nbytes)
        return BucketRead(t, nbytes, n_read, n_skip)
    u = t.column("user_id").to_numpy()
    ts = t.column("event_ts").to_numpy()
    pos = np.searchsorted(users, u)
    pos_c = np.minimum(pos, len(users) - 1)
    keep = (users[pos_c] == u) & (ts >= cutoffs[pos_c])
    keep &= t.column("snapshot_id").to_numpy() <= max_snapshot
    if min_ts is not None:
        keep &= ts >= min_ts
    if actions is not None:
        keep &= np.isin(t.column("action").to_numpy(zero_copy_only=False), actions)
    if not keep.all():
        t = t.filter(pa.array(keep))
    # Library-written files are sorted, but a file rewritten by another Delta writer may not be:
    # the per-user ranges below need the sort, so check it rather than trust it.
    if not _is_sorted(t):
        t = sort_events(t)
    return BucketRead(t, nbytes, n_read, n_skip)


def _merge_files(t: pa.Table, rows: list[int]) -> pa.Table:
    """The rows of several files (``rows`` each, in ``t`` one after another), each sorted by
    :data:`SORT_KEYS` as the library writes them, merged into that order in one pass (a
    bucket's stripes, generations: a k-way merge, not a sort of them all); sorted when a
    file is not (one written by another Delta writer)."""
    u, ts, ids = (t.column(c).to_numpy() for c in SORT_KEYS)
    order = merge_sorted_runs(u, ts, ids, np.cumsum([0, *rows]))
    return sort_events(t) if order is None else t.take(pa.array(order))


def _is_sorted(t: pa.Table) -> bool:
    return is_sorted3(*(t.column(c).to_numpy() for c in SORT_KEYS))


def _read_row_groups(
    store: Store, f: TierFile, groups: list[int], columns: list[str], md: pq.FileMetaData
) -> pa.Table:
    """Row groups of a tier file, decoded once per process: each (row group, column) is served
    from the decoded cache when it is there, and what is missing is decoded and cached."""
    dc = cache()
    # With the cache off, the units of a split bucket share its row groups within a pass.
    memo = None if dc.max_bytes else scoped(tier=True)
    if not dc.max_bytes and memo is None:
        # Nothing is kept: one decode, without cutting it into row groups to keep, in this
        # thread (a reader reads its units in a thread of its own, one per consumer).
        fs, root = store.filesystem()
        with fs.open_input_file(f"{root}/uih/{f.path}") as fh:
            return pq.ParquetFile(fh, metadata=md).read_row_groups(groups, columns=columns,
                                                                   use_threads=False)
    get = dc.get if memo is None else memo.get
    base = (store.store_id, f.path, f.size)
    got: dict[tuple[int, str], pa.Array] = {}
    for g in groups:
        for c in columns:
            a = get((*base, g, c))
            if a is not None:
                got[(g, c)] = a
    miss_g = [g for g in groups if any((g, c) not in got for c in columns)]
    if miss_g:
        # One read of every row group with a missing column, then cut per row group.
        miss_c = [c for c in columns if any((g, c) not in got for g in miss_g)]
        fs, root = store.filesystem()
        with fs.open_input_file(f"{root}/uih/{f.path}") as fh:
            t = pq.ParquetFile(fh, metadata=md).read_row_groups(miss_g, columns=miss_c,
                                                                use_threads=memo is None)
        start = 0
        for g in miss_g:
            n = md.row_group(g).num_rows
            for c in miss_c:
                col = t.column(c).slice(start, n)
                if (g, c) in got:
                    continue
                if memo is None:
                    # A copy: a slice would keep the whole read alive behind its nbytes.
                    a = got[(g, c)] = col.combine_chunks()
                    dc.put((*base, g, c), a, a.nbytes)
                else:  # dropped with the bucket: a zero-copy slice
                    a = got[(g, c)] = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
                    memo[(*base, g, c)] = a
            start += n
    return pa.table({c: pa.chunked_array([got[(g, c)] for g in groups]) for c in columns})
