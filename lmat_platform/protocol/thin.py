"""Thin example tables: the streaming path (``log``) and the batch path (``examples``).

A thin row is the request's own columns plus the versioned pointer, clustered by the user
bucket of the UIH tier. On the streaming path a user's tail events are stored once per file,
in the lists of the user's first row, in arrival order; each row points at its run of them
(thin format 2)::

    request_id | user_id | request_ts | snapshot_id | head_len | head_checksum | tail_len | tail_block | tail_start | tail_item_id
    -----------+---------+------------+-------------+----------+---------------+----------+------------+------------+-------------
    17         | 42      | T1         | 5           | 1203     | 0x9c..        | 2        | 17         | 0          | [i1, i2, i3]   streaming
    19         | 42      | T2         | 5           | 1203     | 0x9c..        | 3        | 17         | 0          | []             streaming
    18         | 42      | T'         | 5           | 1203     | 0x9c..        | null     | null       | null       | null           batch

Request 17's tail is ``[i1, i2]``, request 19's ``[i1, i2, i3]``: the events with
``W_S <= arrival_ts < T`` that serving saw, one list column per event field (``tail_item_id``,
...). A row with a null ``tail_block`` holds its own tail in its lists (thin format 1, written
before; still read). On the batch path ``tail_len`` is null and the tail is read from the raw
log.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction

from lmat_platform.engines import Engine, LocalEngine, is_local
from lmat_platform.engines.files import (
    Part,
    commit_adds,
    merge_bucket_files,
    split_by,
    write_part,
)
from lmat_platform.exceptions import ConcurrencyError, RequestError, ThinTableError
from lmat_platform.hashing import bucket_of
from lmat_platform.kernels import tail_runs
from lmat_platform.protocol.pointers import (
    HeadIndex,
    expand_positions,
    expand_ranges,
    searchsorted2,
)
from lmat_platform.schema import EVENT_COLUMNS, normalize_requests, read_parquet_file
from lmat_platform.store.core import (
    Store,
    as_store,
    checkpoint_if_due,
    delta_dataset,
    shared_delta_table,
    storage_options,
)
from lmat_platform.store.retention import accepted_events
from lmat_platform.store.snapshots import list_snapshots, resolve_snapshot, snapshot_arrays
from lmat_platform.store.thin_registry import (
    ROW_ORDER,
    register_thin_table,
    registered_thin_tables,
    thin_parquet_options,
)

log = logging.getLogger(__name__)

STORE_ID_KEY = "lmat.store_id"
POINTER_COLUMNS = ("snapshot_id", "head_len", "head_checksum")
#: The streaming tail is stored column by column (``tail_item_id``, ``tail_event_ts``, ...: one
#: list column per event field) so that a reader decodes only the fields its tenant needs;
#: ``tail_len`` is its length, null on the batch path.
TAIL_PREFIX = "tail_"
#: Streaming rows store each user's tail events once per file (thin format 2): the row whose
#: ``request_id`` is a row's ``tail_block`` holds its user's events of the file in its
#: ``tail_<field>`` lists, in arrival order, and the row's tail is the ``tail_len`` events from
#: ``tail_start`` on. Rows with a null ``tail_block`` hold their own tail (format 1, or none).
TAIL_BLOCK = "tail_block"
TAIL_START = "tail_start"
#: Thin format 3: a stored tail event's ``arrival_ts`` is kept as its delay after its
#: ``event_ts`` (``arrival_ts - event_ts``, never negative for an accepted event), in this list
#: column, and ``tail_arrival_ts`` holds null lists; readers add the two back
#: (:func:`lmat_platform.reconstruct.tail_arrival`), exactly. The delay is a few hundred
#: milliseconds for most events, the arrival time a full timestamp: on the demo this stores
#: an event's arrival in 3.1 bytes instead of 3.8 (and no reader decodes it unless its tenant
#: asks for ``arrival_ts``). Rows with ``tail_arrival_ts`` values (formats 1 and 2) are read
#: as before.
TAIL_ARRIVAL_DELAY = "tail_arrival_delay"
#: The thin format ``log`` and ``examples`` write, recorded in each commit's metadata as
#: ``lmat.thin_format`` (readers go by each row's columns: all formats mix in one table).
THIN_FORMAT = 3
#: ``ROW_ORDER`` (the order of a thin file's rows) and ``thin_parquet_options`` live with the
#: store's registry of thin tables (:mod:`lmat_platform.store.thin_registry`): deletion
#: rewrites thin files too.
_DROP_FROM_TAIL = ("bucket", "source", "batch_id")


def read_thin_file(frag: pads.ParquetFileFragment, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """``columns`` of one thin file, typed as in the table's ``schema``: a partition column
    from the file's partition value, a column the file lacks (written before the table's
    schema grew) as nulls.

    Read straight from the file with its footer (parsed once: the fragment keeps it), in the
    calling thread: a dataset scan sets up a scanner and its threads per file, which for a
    thin file of a few thousand rows costs several times the decode (a reader with the
    decoded cache off reads every thin file of its buckets each pass)."""
    have = set(frag.physical_schema.names)
    names = [c for c in columns if c in have]
    with frag.filesystem.open_input_file(frag.path) as fh:
        t = pq.ParquetFile(fh, metadata=frag.metadata).read(columns=names, use_threads=False)
    # One schema comparison, not one per column (DataType equality costs microseconds).
    want, want_read = _thin_schemas(schema, tuple(columns), tuple(names))
    t = t.select(names)
    if not t.schema.equals(want_read):
        t = t.cast(want_read)
    if len(names) == len(columns):
        return t
    parts = pads.get_partition_keys(frag.partition_expression)
    for i, c in enumerate(columns):
        if c in have:
            continue
        f = want.field(c)
        # Inserted in place: the table's other columns are checked already.
        t = t.add_column(i, f, pa.array(np.full(t.num_rows, parts[c]), f.type) if c in parts
                         else pa.nulls(t.num_rows, f.type))
    return t


_SCHEMAS: dict[tuple[int, tuple[str, ...], tuple[str, ...]],
               tuple[pa.Schema, pa.Schema, pa.Schema]] = {}


def _thin_schemas(schema: pa.Schema, columns: tuple[str, ...],
                  names: tuple[str, ...]) -> tuple[pa.Schema, pa.Schema]:
    """``columns`` and ``names`` (those a file holds) typed as in a thin table's ``schema``,
    built once per schema and projection (a cache-off pass reads every thin file again)."""
    key = (id(schema), columns, names)
    got = _SCHEMAS.get(key)
    if got is None or got[2] is not schema:  # ids are reused once a schema is gone
        want = pa.schema([schema.field(c) for c in columns])
        got = _SCHEMAS[key] = (want, pa.schema([want.field(c) for c in names]), schema)
        if len(_SCHEMAS) > 256:  # many tables in one process: start again
            _SCHEMAS.clear()
    return got[0], got[1]


def tail_struct_type(store: Store) -> pa.StructType:
    """The event struct held in tails: every stored event column and trait."""
    raw = store.open_table("raw")
    if raw is None:
        return pa.struct([pa.field(c, t) for c, t in EVENT_COLUMNS.items()])
    schema = pa.schema(raw.schema().to_arrow())
    return pa.struct([f for f in schema if f.name not in _DROP_FROM_TAIL])


def read_raw_range(
    store: Store,
    users: np.ndarray,
    lo: int | None,
    hi: int,
    *,
    buckets: np.ndarray | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Accepted events of ``users`` with ``lo <= arrival_ts < hi``, sorted by (user, arrival):
    the raw log's, and the tier's where the raw log has retired them (spec section 3: the
    batch path reads its tail from the tier's later snapshots and the raw log's rest)."""
    if store.shared_table("raw") is None or len(users) == 0:
        return pa.table({c: pa.array([], t) for c, t in EVENT_COLUMNS.items()})
    t = accepted_events(store, users=users, buckets=buckets, lo=lo, hi=hi, columns=columns)
    return t.sort_by([("user_id", "ascending"), ("arrival_ts", "ascending")])


def tails_from_raw(
    raw: pa.Table, users: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (request index, raw row) with the raw row of the request's user and
    ``lo[i] <= arrival_ts < hi[i]``; ``raw`` sorted by (user_id, arrival_ts)."""
    ru = raw.column("user_id").to_numpy()
    ra = raw.column("arrival_ts").to_numpy()
    # Only the rows inside each request's arrival range are expanded.
    s = searchsorted2(ru, ra, users, lo)
    e = searchsorted2(ru, ra, users, hi)
    return expand_ranges(s, e)


@dataclass
class TailBlocks:
    """Where each request's tail lives in the per-user format (see :data:`TAIL_BLOCK`)."""

    #: Per request: the request id of the row that stores its user's events.
    block: np.ndarray
    #: Per request: offset of its first tail event among its user's stored events.
    start: np.ndarray
    #: Per request: events its own row stores (its user's, in the user's first row; else 0).
    stored: np.ndarray
    #: The stored events' positions in the source (in arrival order), row after row.
    positions: np.ndarray


def user_tail_blocks(
    users: np.ndarray, request_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> TailBlocks:
    """Each user's tail events once: requests (grouped by user, in file order) whose tails are
    the source runs ``[lo[i], hi[i])`` (a user's events in arrival order) point into the union
    of their user's runs, stored in the user's first row. Overlapping or touching runs are
    stored once; a gap between them (events no request of the user has in its tail) is not
    stored."""
    block, start, stored, run_a, run_b = tail_runs(users, request_ids, lo, hi)
    positions = expand_positions(run_a, run_b).astype(np.int64) if len(run_a) else \
        np.zeros(0, dtype=np.int64)
    return TailBlocks(block, start, stored, positions)


def arrival_delay(events: pa.Table) -> pa.Array | None:
    """``arrival_ts - event_ts`` of each of ``events`` (int64), as thin format 3 stores it
    (:data:`TAIL_ARRIVAL_DELAY`); None where it cannot stand for the arrival time exactly: a
    column missing or not int64, or a null in either (then ``tail_arrival_ts`` keeps them)."""
    if not {"event_ts", "arrival_ts"} <= set(events.column_names):
        return None
    ev, ar = (events.column(c).combine_chunks() for c in ("event_ts", "arrival_ts"))
    if ev.type != pa.int64() or ar.type != pa.int64() or ev.null_count or ar.null_count:
        return None
    # Wraps like the reader's addition does, so the sum is exact even for extreme times.
    return pa.array(ar.to_numpy() - ev.to_numpy())


def build_thin_rows(
    store: Store | str, requests: pa.Table, *, path: Literal["log", "examples"], where: str
) -> pa.Table:
    """Thin rows for ``requests`` (already normalized): pointers, and tails on the log path."""
    store = as_store(store)
    snaps = list_snapshots(store)
    pub, wm = snapshot_arrays(snaps)
    users = requests.column("user_id").to_numpy()
    ts = requests.column("request_ts").to_numpy()
    buckets = bucket_of(users, store.n_buckets)
    # Rows in the order a thin file keeps them (bucket, then ROW_ORDER): a user's rows are
    # consecutive, which the per-user tails rely on.
    order = np.lexsort((*(requests.column(c).to_numpy() for c in reversed(ROW_ORDER)), buckets))
    if len(order) and (np.diff(order) != 1).any():
        requests = requests.take(pa.array(order))
        users, ts, buckets = users[order], ts[order], buckets[order]
    s = resolve_snapshot(pub, ts)
    heads = HeadIndex.load(store, users, buckets)
    hl, cs = heads.pointers(users, s)
    if len(hl) and hl.max() > np.iinfo(np.int32).max:
        raise RequestError(f"{where}: a head is longer than 2^31 events")
    w_s = np.where(s >= 0, wm[np.maximum(s, 0)] if len(wm) else 0, np.iinfo(np.int64).min)
    cols = {
        **{c: requests.column(c) for c in ("request_id", "user_id", "request_ts")},
        "bucket": pa.array(buckets),
        "snapshot_id": pa.array(s.astype(np.int32)),
        "head_len": pa.array(hl.astype(np.int32)),
        "head_checksum": pa.array(cs),
    }
    stype = tail_struct_type(store)
    if path == "log":
        lo = int(w_s.min()) if len(w_s) and (s >= 0).all() else None
        hi = int(ts.max()) if len(ts) else 0
        raw = read_raw_range(store, users, lo, hi, buckets=buckets,
                             columns=[f.name for f in stype])
        # Arrival order, ties by event id: each request's tail is one run of its user's events.
        raw = raw.sort_by([("user_id", "ascending"), ("arrival_ts", "ascending"),
                           ("event_id", "ascending")])
        ru = raw.column("user_id").to_numpy()
        ra = raw.column("arrival_ts").to_numpy()
        t_lo = searchsorted2(ru, ra, users, w_s)
        t_hi = searchsorted2(ru, ra, users, ts)
        blocks = user_tail_blocks(users, requests.column("request_id").to_numpy(), t_lo, t_hi)
        # Each user's events once, in its first row's lists; no events in its other rows.
        ev = raw.take(pa.array(blocks.positions))
        ev_off = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(blocks.stored, out=ev_off[1:])
        off = pa.array(ev_off.astype(np.int32))
        cols["tail_len"] = pa.array((t_hi - t_lo).astype(np.int32))
        cols[TAIL_BLOCK] = pa.array(blocks.block)
        cols[TAIL_START] = pa.array(blocks.start)
        for f in stype:
            vals = (ev.column(f.name).combine_chunks().cast(f.type) if f.name in ev.column_names
                    else pa.nulls(ev.num_rows, f.type))
            cols[TAIL_PREFIX + f.name] = pa.ListArray.from_arrays(off, vals)
        delay = arrival_delay(ev)
        if delay is not None:
            cols[TAIL_PREFIX + "arrival_ts"] = pa.nulls(len(users), pa.list_(pa.int64()))
            cols[TAIL_ARRIVAL_DELAY] = pa.ListArray.from_arrays(off, delay)
    else:
        cols["tail_len"] = pa.nulls(len(users), pa.int32())
        for f in stype:
            cols[TAIL_PREFIX + f.name] = pa.nulls(len(users), pa.list_(f.type))
    for c in requests.column_names:
        if c not in cols:
            cols[c] = requests.column(c)
    return pa.table(cols)  # already in (bucket, *ROW_ORDER) order


def thin_store_id(dt: DeltaTable) -> str | None:
    """The store id a thin table was written for (kept in the table's description)."""
    import json

    try:
        desc = json.loads(dt.metadata().description or "{}")
    except ValueError:
        return None
    return desc.get(STORE_ID_KEY) if isinstance(desc, dict) else None


def open_thin(store: Store, uri: str, *, shared: bool = False) -> DeltaTable:
    """Open a thin table and check it belongs to ``store``; ``shared``: the process's read-only
    view of its latest version (:func:`~lmat_platform.store.core.shared_delta_table`)."""
    if "://" not in uri and os.path.exists(uri) and not os.path.isdir(uri):
        raise ThinTableError(
            f"{uri}: is a file, not a thin table (the Delta table folder that "
            "'lmat log' or 'lmat examples' wrote with --out)"
        )
    try:
        dt = (shared_delta_table(uri) if shared
              else DeltaTable(uri, storage_options=storage_options()))
    except TableNotFoundError:
        dt = None
    if dt is None:
        raise ThinTableError(f"{uri}: no thin table here")
    check_thin_owner(thin_store_id(dt), store, uri)
    return dt


def check_thin_owner(sid: str | None, store: Store, uri: str) -> None:
    """Raise unless a thin table whose log names store ``sid`` belongs to ``store``."""
    if sid is None:
        raise ThinTableError(f"{uri}: not an lmat thin table (no {STORE_ID_KEY})")
    if sid != store.store_id:
        raise ThinTableError(
            f"{uri}: thin table belongs to store {sid}, not to {store.root} ({store.store_id})"
        )


def write_thin(
    store: Store | str,
    requests_path: str,
    out: str,
    *,
    path: Literal["log", "examples"],
    engine: Engine | None = None,
) -> dict[str, object]:
    """``lmat log`` / ``lmat examples``: read a request file, write (append) thin rows to ``out``;
    ``engine`` (Ray): one task per bucket builds and writes its rows (one commit, here).

    Concurrent writers (spec sections 7 and 11): the rows are built, written and committed
    holding the store's write lock (the lease on ``s3://``), as ``forget`` rewrites thin files
    and ``vacuum`` expires logs: a forget either returned before this read the store (the
    forgotten user's requests here are new, their heads and tails hold only what was ingested
    after it) or reads the table after this commit and deletes the rows with the others. Before,
    an append that committed between a forget's read and its commit kept the user's rows (their
    pointers naming the head the forget deleted) after the forget returned."""
    from lmat_platform.store.lease import check_lease

    store = as_store(store)
    req = normalize_requests(read_parquet_file(requests_path, what="request file"), where=requests_path)
    _thin_target(store, out)  # a wrong --out is refused before waiting for the lock
    custom = {"lmat.op": path, "lmat.thin_format": str(THIN_FORMAT)}
    with store.write_lock():
        check_lease(store.root)
        existing = _thin_target(store, out)  # read inside the lock, as the rows are built
        if existing is not None:
            have = delta_dataset(existing).to_table(columns=["request_id"]).column("request_id")
            clash = np.intersect1d(have.to_numpy(), req.column("request_id").to_numpy())
            if len(clash):
                raise RequestError(
                    f"{requests_path}: request_id {int(clash[0])} is already in {out} "
                    f"({len(clash)} request(s) overlap)"
                )
        description = None if existing is not None else json.dumps(
            {STORE_ID_KEY: store.store_id, "kind": "lmat thin examples"})
        if not is_local(engine) and req.num_rows:
            return _write_thin_parts(store, req, out, existing, path=path, where=requests_path,
                                     engine=engine, description=description, custom=custom)
        rows = build_thin_rows(store, req, path=path, where=requests_path)
        # Registered before the first row is written (idempotent), so that ``forget`` finds
        # every table holding examples of a user, even one whose writer was killed after its
        # commit.
        register_thin_table(store, out if "://" in out else os.path.abspath(out))
        have_schema = pa.schema(existing.schema().to_arrow()) if existing is not None else None
        adds = [_thin_file(out, part, have_schema) for _, part in split_by(rows, "bucket")]
        dt = _commit_thin(out, existing, adds, rows.schema, description=description,
                          custom=custom)
    return _thin_result(rows, path, out, dt.version())


def _thin_target(store: Store, out: str) -> DeltaTable | None:
    """The thin table at ``out`` to append to (checked to belong to ``store``), or None where
    ``log``/``examples`` will create it; refuses anything else at ``out``."""
    if DeltaTable.is_deltatable(out, storage_options=storage_options()):
        return open_thin(store, out)
    if (os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out))
            and not _killed_first_write(store, out)):
        raise ThinTableError(f"{out}: exists and is not a thin table")
    return None


def _killed_first_write(store: Store, out: str) -> bool:
    """Whether the folder ``out`` holds only what a first ``log``/``examples`` to it leaves when
    it is killed after registering the table with ``store`` and before the commit that creates
    it: no Delta log (or an empty one), ``bucket=N`` folders of Parquet files. The re-run then
    creates the table there; the files nothing references are removed by the next vacuum."""
    if os.path.abspath(out) not in registered_thin_tables(store):
        return False
    for name in os.listdir(out):
        p = os.path.join(out, name)
        if name == "_delta_log" and os.path.isdir(p) and not os.listdir(p):
            continue
        if not (name.startswith("bucket=") and os.path.isdir(p)
                and all(f.endswith(".parquet") for f in os.listdir(p))):
            return False
    return True


#: Attempts of a thin table's merge whose commit a concurrent commit conflicted with (see
#: :func:`compact_thin`); each reads the table afresh.
COMPACT_ATTEMPTS = 3


def compact_thin(store: Store | str, uri: str, *, min_files: int = 2) -> dict[str, int]:
    """Merge each bucket's files of the thin table at ``uri`` into one file, its rows in
    :data:`ROW_ORDER`, written with the thin files' options, in one commit whose adds and
    removes all carry ``dataChange = false`` (a layout-only rewrite, as the tier's
    compaction). Buckets with fewer than ``min_files`` files are left as they are.

    A thin table gets one file per bucket from every request file logged (``lmat log`` an
    hour's requests: a file per bucket and hour); a reader decodes every one of a bucket's
    files each pass it reads the bucket without its decoded cache, and each column chunk
    costs about as much again to set up as to decode at a few thousand rows, so a pass over
    merged files decodes the same rows in about half the time (and in ``ROW_ORDER``, merges
    nothing). Rows are copied unchanged: a row pointing into its user's tail events stored
    with another request (``tail_block``) finds that row among its bucket's rows as before.
    The merged-away files stay on storage until the table is vacuumed.

    Concurrent writers (spec sections 7 and 11): the merge holds the store's write lock (the
    lease on ``s3://``) from its read of the table to its commit, as ``forget`` does while it
    rewrites thin files, so a forget either committed before the merge read the table or
    rewrites the merged file after it; a merge never carries a forgotten user's rows back.
    ``lmat log`` / ``lmat examples`` hold the lock too (:func:`write_thin`). A commit that
    Delta's conflict check refuses (a writer outside the lock that added columns or deleted
    rows) is retried on a fresh read, :data:`COMPACT_ATTEMPTS` times
    in all; the refused attempt leaves only unreferenced files, as a killed one does (vacuum
    removes them)."""
    from lmat_platform.store.lease import check_lease

    store = as_store(store)
    open_thin(store, uri)  # a wrong URI is refused before waiting for the lock
    root = uri if "://" in uri else os.path.abspath(uri)
    with store.write_lock():
        for attempt in range(1, COMPACT_ATTEMPTS + 1):
            check_lease(store.root)
            dt = open_thin(store, uri)  # read inside the lock
            try:
                new, out = merge_bucket_files(dt, root, order=ROW_ORDER,
                                              options=thin_parquet_options,
                                              min_files=min_files, op="compact_thin",
                                              error=ThinTableError)
                break
            except CommitFailedError as e:
                if attempt == COMPACT_ATTEMPTS:
                    raise ConcurrencyError(
                        f"{uri}: concurrent commits conflicted with the merge of its files "
                        f"{attempt} times (last: {str(e).splitlines()[0]}); nothing was "
                        "changed: re-run the command") from e
                log.warning("%s: a concurrent commit conflicted with the merge of version %d "
                            "(%s); merging again from the table's new version", uri,
                            dt.version(), str(e).splitlines()[0])
        if not out["buckets"]:
            return out
        checkpoint_if_due(new)
    log.info("thin table %s: merged %d files into %d (version %d)", uri, out["files_in"],
             out["files_out"], new.version())
    return {**out, "version": new.version()}


def _thin_file(out: str, rows: pa.Table, have: pa.Schema | None) -> AddAction:
    """Write one bucket's thin rows (in file order) as one file of the thin table at ``out``
    (typed as its schema ``have``, when it exists), with the thin files' writer options."""
    b = str(int(rows.column("bucket")[0].as_py()))
    return write_part(Part(out if "://" in out else os.path.abspath(out), rows, (("bucket", b),),
                           options=thin_parquet_options(rows.schema), schema=have))


def _commit_thin(
    out: str, existing: DeltaTable | None, adds: list[AddAction], schema: pa.Schema, *,
    description: str | None, custom: dict[str, str],
) -> DeltaTable:
    """Commit a request file's thin files in one commit: to ``existing`` (the rows' new
    columns added to its schema), or creating the table at ``out``."""
    if existing is not None:
        have = pa.schema(existing.schema().to_arrow())
        schema = pa.schema([*have, *(f for f in schema if f.name not in have.names)])
    dt = commit_adds(existing if existing is not None else out, adds, schema,
                     partition_by=["bucket"], props=CommitProperties(custom_metadata=custom),
                     description=description)
    checkpoint_if_due(dt)
    return dt


def _thin_result(rows: pa.Table, path: str, out: str, version: int) -> dict[str, object]:
    n_tail = int(pc.sum(rows.column("tail_len")).as_py() or 0) if path == "log" else 0
    return {
        "path": path,
        "requests": rows.num_rows,
        "tail_events": n_tail,
        "out": out,
        "version": version,
    }


def _write_thin_parts(
    store: Store, req: pa.Table, out: str, existing: DeltaTable | None, *,
    path: Literal["log", "examples"], where: str, engine: Engine | None, description: str | None,
    custom: dict[str, str],
) -> dict[str, object]:
    """:func:`write_thin` with one ``engine`` task per bucket: each builds its bucket's thin
    rows (a user's rows are all in its bucket) and writes them as the bucket's file; the driver
    registers the table first and commits every file in one commit, as the local path does."""
    have = pa.schema(existing.schema().to_arrow()) if existing is not None else None
    parts = split_by(req.append_column(
        "__bucket", pa.array(bucket_of(req.column("user_id").to_numpy(), store.n_buckets))),
        "__bucket")
    register_thin_table(store, out if "://" in out else os.path.abspath(out))
    got = (engine or LocalEngine()).map(
        _thin_bucket, [(store, rows.drop_columns(["__bucket"]), path, where, out, have)
                       for _, rows in parts])
    dt = _commit_thin(out, existing, [g[0] for g in got], got[0][1], description=description,
                      custom=custom)
    totals = pa.table({"tail_len": pa.concat_arrays([g[2] for g in got])})
    return {**_thin_result(totals, path, out, dt.version()), "requests": req.num_rows}


def _thin_bucket(
    item: tuple[Store, pa.Table, Literal["log", "examples"], str, str, pa.Schema | None],
) -> tuple[AddAction, pa.Schema, pa.Array]:
    """One bucket's thin rows, written as one file of the thin table (a task of any engine):
    its add action, the rows' schema and their ``tail_len``."""
    store, req, path, where, out, have = item
    rows = build_thin_rows(store, req, path=path, where=where)
    return _thin_file(out, rows, have), rows.schema, rows.column("tail_len").combine_chunks()
