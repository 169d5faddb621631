"""The accepted-id index: what makes ingest's duplicate check cost the batch, not the store.

Spec section 2 drops a row whose ``event_id`` was already accepted. Answering that by reading
every accepted id (the raw log's ``event_id`` column) costs the whole store per batch; this
module keeps the accepted ids in their own Delta table, ``ids/``, laid out so that a batch
reads only the part of it that can hold its ids::

    ids/part-<uuid>.parquet     event_id (sorted), user_id; row groups of 16,384 ids,
                                event_id DELTA_BINARY_PACKED (sorted ids cost ~1-2 bytes each)

Each accepted batch adds one file of its ids, sorted. A lookup sorts the batch's ids and
keeps, from the Delta log's per-file statistics alone, the files whose ``[min, max]`` holds one
of them; then, from those files' footers (cached: files never change), the row groups whose
``[min, max]`` holds one; it decodes only those, one row group at a time (bounded memory), and
marks hits with a binary search. Event ids are assigned in time order in practice (snowflake
ids, sequences per producer; the workload generator's are day-ordered), so a batch's ids and
its duplicates (re-sent recent events) fall in few, narrow files and row groups: the cost is
the batch's, whatever the store holds. Ids without any order still work, in memory bounded by
one row group, at the cost of reading the row groups their ids hit.

Files are merged by size class (a log-structured merge: eight files of one class become one,
while the result stays under :data:`MAX_FILE_ROWS`), so the log holds O(log) small files and
files of up to 4M ids; a merge is a layout-only commit (``dataChange = false``).

Crash ordering (with ingest's raw-log commit, which stays the single commit point of a batch):

1. ingest catches the index up with the raw log first (:func:`catch_up`): every ``ingest``
   commit of the raw log newer than the index's app transaction ``lmat-ids`` (the raw version
   it covers) has its ids added. So a batch whose raw commit landed and whose index commit did
   not (a kill between the two) is indexed before any later batch is checked.
2. the batch's ids are checked against the index, and its accepted rows committed to the raw
   log (the commit point: readers see the whole batch or none of it);
3. its ids are committed to the index with app transaction ``(lmat-ids, raw version)``.

The index therefore never holds an id the raw log has not accepted (it follows the raw log),
and never misses one when a check runs (step 1). A kill before 2 leaves raw and index as they
were; after 2 and before 3, the next writer finishes 3. ``user_id`` is kept beside each id so
that ``forget`` deletes a user's ids with the other per-user tables (section 7).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.store.core import Store, checkpoint_if_due, delta_dataset, now_us

log = logging.getLogger(__name__)

TABLE = "ids"
#: App transaction of the index: its version is the raw log version the index covers.
APP_ID = "lmat-ids"
ROW_GROUP_IDS = 16_384
#: A merge never makes a file larger than this (it holds the merged ids in memory: 64 MB).
MAX_FILE_ROWS = 4_000_000
MERGE_FANOUT = 8
SCHEMA = pa.schema([("event_id", pa.int64()), ("user_id", pa.int64())])


@dataclass
class LookupStats:
    """What one duplicate check read."""

    ids: int = 0
    files: int = 0
    files_read: int = 0
    row_groups_read: int = 0
    bytes_read: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _IdFile:
    path: str
    size: int
    rows: int
    lo: int
    hi: int


def _files(dt: DeltaTable) -> list[_IdFile]:
    t = pa.table(dt.get_add_actions(flatten=True))
    if t.num_rows == 0:
        return []
    return [
        _IdFile(p, int(s), int(n), int(lo), int(hi))
        for p, s, n, lo, hi in zip(
            t.column("path").to_pylist(), t.column("size_bytes").to_pylist(),
            t.column("num_records").to_pylist(), t.column("min.event_id").to_pylist(),
            t.column("max.event_id").to_pylist(), strict=True)
    ]


def _stats_json(ids: np.ndarray, users: np.ndarray) -> str:
    return json.dumps({
        "numRecords": len(ids),
        "minValues": {"event_id": int(ids[0]), "user_id": int(users.min())},
        "maxValues": {"event_id": int(ids[-1]), "user_id": int(users.max())},
        "nullCount": {"event_id": 0, "user_id": 0},
    })


def _write_file(store: Store, ids: np.ndarray, users: np.ndarray, *, data_change: bool) -> AddAction:
    """One index file of ``ids`` (sorted, unique) and their users; not visible until committed."""
    fs, root = store.filesystem()
    rel = f"part-{uuid.uuid4().hex}.parquet"
    fs.create_dir(f"{root}/{TABLE}", recursive=True)
    full = f"{root}/{TABLE}/{rel}"
    t = pa.table({"event_id": pa.array(ids, pa.int64()), "user_id": pa.array(users, pa.int64())})
    with fs.open_output_stream(full) as out:
        pq.write_table(
            t, out, row_group_size=ROW_GROUP_IDS, compression="zstd", use_dictionary=False,
            column_encoding={"event_id": "DELTA_BINARY_PACKED", "user_id": "PLAIN"},
            write_statistics=["event_id"],
        )
    size = fs.get_file_info(full).size or 0
    return AddAction(rel, size, {}, now_us() // 1000, data_change, _stats_json(ids, users))


def _commit(
    store: Store, actions: list[AddAction | RemoveAction], *, op: str,
    txn: tuple[str, int] | None, metadata: dict[str, object] | None = None,
    dt: DeltaTable | None = None,
) -> DeltaTable:
    """Commit ``actions`` to the index (``dt``: the index as the caller just opened it, else
    opened here); returns the index after the commit."""
    custom = {"lmat.op": op, **{f"lmat.{k}": str(v) for k, v in (metadata or {}).items()}}
    props = CommitProperties(
        custom_metadata=custom,
        app_transactions=[Transaction(app_id=txn[0], version=txn[1])] if txn else None,
    )
    dt = dt if dt is not None else store.open_table(TABLE)
    if dt is None:
        from deltalake import Schema as DSchema
        from deltalake.transaction import create_table_with_add_actions

        create_table_with_add_actions(
            store.table_uri(TABLE), DSchema.from_arrow(SCHEMA), list(actions),  # type: ignore[arg-type]
            mode="error", commit_properties=props,
        )
        dt = store.open_table(TABLE)
        assert dt is not None
    else:
        dt.create_write_transaction(list(actions), "append", SCHEMA, commit_properties=props)
        dt = store.open_table(TABLE)
        assert dt is not None
        checkpoint_if_due(dt)
    return dt


def indexed_through(store: Store) -> int | None:
    """The raw log version the index covers (None: no index yet)."""
    return store.txn_version(TABLE, APP_ID)


def add_ids(store: Store, ids: np.ndarray, users: np.ndarray, *, raw_version: int) -> None:
    """Index the ids of an accepted batch (unique among themselves and in the index), in one
    commit that records ``raw_version`` as covered; idempotent per raw version."""
    dt = store.open_table(TABLE)  # opened once for the check, the commit and the merge
    done = dt.transaction_version(APP_ID) if dt is not None else None
    if done is not None and done >= raw_version:
        return
    actions: list[AddAction | RemoveAction] = []
    if len(ids):
        o = np.argsort(ids, kind="stable")
        actions.append(_write_file(store, ids[o], users[o], data_change=True))
    dt = _commit(store, actions, op="index_ids", txn=(APP_ID, raw_version),
                 metadata={"raw_version": raw_version, "ids": len(ids)}, dt=dt)
    merge_ids(store, dt)


def _raw_commit_adds(store: Store, version: int) -> tuple[str | None, list[str]] | None:
    """(``lmat.op``, added file paths) of raw log commit ``version``; None if its commit file
    is gone (expired by the log retention)."""
    fs, root = store.filesystem()
    p = f"{root}/raw/_delta_log/{version:020d}.json"
    try:
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError):
        return None
    op, adds = None, []
    for line in text.splitlines():
        if not line.strip():
            continue
        a = json.loads(line)
        if "commitInfo" in a:
            op = a["commitInfo"].get("lmat.op")
        elif "add" in a:
            adds.append(urllib.parse.unquote(a["add"]["path"]))
    return op, adds


def _read_id_columns(store: Store, table: str, rel: str) -> tuple[np.ndarray, np.ndarray]:
    fs, root = store.filesystem()
    with fs.open_input_file(f"{root}/{table}/{rel}") as fh:
        t = pq.read_table(fh, columns=["event_id", "user_id"])
    return t.column("event_id").to_numpy(), t.column("user_id").to_numpy()


def catch_up(store: Store) -> int:
    """Index every ingest commit of the raw log the index does not cover yet (a writer killed
    between its raw and its index commit, or a store written before the index existed); returns
    the ids added. Called under the store's write lock before every duplicate check."""
    raw = store.open_table("raw")
    if raw is None:
        return 0
    current = raw.version()
    done = indexed_through(store)
    start = 0 if done is None else done + 1
    if start > current:
        return 0
    id_parts, user_parts = [], []
    for v in range(start, current + 1):
        got = _raw_commit_adds(store, v)
        if got is None:
            log.warning("raw log commit %d is expired: rebuilding the accepted-id index", v)
            return rebuild(store)
        op, adds = got
        if op != "ingest":
            continue
        for rel in adds:
            ids, users = _read_id_columns(store, "raw", rel)
            id_parts.append(ids)
            user_parts.append(users)
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    users = np.concatenate(user_parts) if user_parts else np.zeros(0, np.int64)
    if len(ids):
        log.info("index catch-up: %d ids of raw versions %d..%d", len(ids), start, current)
    add_ids(store, ids, users, raw_version=current)
    return len(ids)


def cover_maintenance(store: Store) -> None:
    """Record the raw log's latest version as covered without reading it: only for a writer
    holding the store's lock that caught the index up (:func:`catch_up`) and has made no
    ingest commit since (``vacuum``: its own commits are vacuum records, and it expires the
    log entries :func:`catch_up` would otherwise have to read)."""
    raw = store.open_table("raw")
    done = indexed_through(store)
    if raw is None or done is None or done >= raw.version():
        return
    _commit(store, [], op="index_ids", txn=(APP_ID, raw.version()),
            metadata={"raw_version": raw.version(), "ids": 0, "maintenance": 1})


def rebuild(store: Store) -> int:
    """Rewrite the index from every accepted event the store holds (raw log and tier), in
    memory bounded by :data:`MAX_FILE_ROWS` ids plus one row group per sorted run; for stores
    whose raw log expired the commits the index had not covered. One commit replaces the whole
    index.

    The raw log and the tier overlap (until the raw log's retention drops published rows), so
    an id can be read twice, in different chunks: each chunk of :data:`MAX_FILE_ROWS` ids is
    sorted and deduplicated into a run (a local temporary file), and the runs are merged
    (:func:`_merge_runs`), which drops the ids two runs share."""
    import tempfile

    raw = store.open_table("raw")
    current = raw.version() if raw is not None else -1
    adds: list[AddAction | RemoveAction] = []
    n = 0
    with tempfile.TemporaryDirectory(prefix="lmat-ids-") as tmp:
        runs: list[str] = []
        for ids, users in _all_accepted(store):
            ids, first = np.unique(ids, return_index=True)
            run = f"{tmp}/run-{len(runs)}.parquet"
            pq.write_table(pa.table({"event_id": ids, "user_id": users[first]}), run,
                           row_group_size=ROW_GROUP_IDS, compression="none")
            runs.append(run)
        for ids, users in _merge_runs(runs):
            adds.append(_write_file(store, ids, users, data_change=True))
            n += len(ids)
    dt = store.open_table(TABLE)
    if dt is not None:
        ts = now_us() // 1000
        adds += [RemoveAction(f.path, True, ts, f.size, {}) for f in _files(dt)]
    _commit(store, adds, op="rebuild_ids", txn=(APP_ID, current), metadata={"ids": n})
    return n


def _merge_runs(runs: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Merge sorted runs of unique ids (Parquet files, ``event_id``, ``user_id``) into sorted,
    unique chunks of at most :data:`MAX_FILE_ROWS` ids (an id in several runs keeps its first
    run's user), holding one row group per run and one chunk.

    Each round takes, from every run's buffered row group, the ids up to the smallest last id
    buffered by a run that has more to read (any larger id of that run is still unread):
    everything at or below it is buffered, so the round's ids are all the ids up to it, and
    the next round's are larger."""
    files = [pq.ParquetFile(r) for r in runs]
    nxt = [0] * len(files)
    buf: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64),) * 2] * len(files)
    out_i: list[np.ndarray] = []
    out_u: list[np.ndarray] = []
    held = 0
    while True:
        for r, f in enumerate(files):
            while not len(buf[r][0]) and nxt[r] < f.metadata.num_row_groups:
                t = f.read_row_group(nxt[r])
                buf[r] = (t.column(0).to_numpy(), t.column(1).to_numpy())
                nxt[r] += 1
        more = [buf[r][0][-1] for r, f in enumerate(files)
                if len(buf[r][0]) and nxt[r] < f.metadata.num_row_groups]
        bound = min(more) if more else None
        take_i, take_u = [], []
        for r, (ids, users) in enumerate(buf):
            k = len(ids) if bound is None else int(np.searchsorted(ids, bound, side="right"))
            take_i.append(ids[:k])
            take_u.append(users[:k])
            buf[r] = (ids[k:], users[k:])
        ids = np.concatenate(take_i)
        if len(ids):
            ids, first = np.unique(ids, return_index=True)  # first: the earliest run's
            out_i.append(ids)
            out_u.append(np.concatenate(take_u)[first])
            held += len(ids)
        while held >= MAX_FILE_ROWS or (bound is None and held):
            ids, users = np.concatenate(out_i), np.concatenate(out_u)
            yield ids[:MAX_FILE_ROWS], users[:MAX_FILE_ROWS]
            out_i, out_u = [ids[MAX_FILE_ROWS:]], [users[MAX_FILE_ROWS:]]
            held = len(out_i[0])
        if bound is None:
            return


def _all_accepted(store: Store) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every accepted (event_id, user_id) the raw log and the tier hold, in chunks of about
    :data:`MAX_FILE_ROWS` (an id in both appears twice)."""
    buf_i: list[np.ndarray] = []
    buf_u: list[np.ndarray] = []
    held = 0
    for name in ("raw", "uih"):
        dt = store.open_table(name)
        if dt is None:
            continue
        ds = delta_dataset(dt)
        for b in ds.to_batches(columns=["event_id", "user_id"]):
            buf_i.append(b.column(0).to_numpy())
            buf_u.append(b.column(1).to_numpy())
            held += b.num_rows
            if held >= MAX_FILE_ROWS:
                yield np.concatenate(buf_i), np.concatenate(buf_u)
                buf_i, buf_u, held = [], [], 0
    if held:
        yield np.concatenate(buf_i), np.concatenate(buf_u)


@functools.lru_cache(maxsize=4096)
def _footer(uri: str, store_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row group of an index file: (min id, max id, compressed bytes of event_id)."""
    del store_id
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    with fs.open_input_file(path) as f:
        md = pq.ParquetFile(f).metadata
    n = md.num_row_groups
    lo, hi, nb = (np.zeros(n, np.int64) for _ in range(3))
    for g in range(n):
        c = md.row_group(g).column(0)
        st = c.statistics
        lo[g] = st.min if st is not None and st.has_min_max else np.iinfo(np.int64).min
        hi[g] = st.max if st is not None and st.has_min_max else np.iinfo(np.int64).max
        nb[g] = c.total_compressed_size
    return lo, hi, nb


def overlaps(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For ranges [lo[i], hi[i]], whether sorted ``q`` has a value inside."""
    return np.searchsorted(q, hi, side="right") > np.searchsorted(q, lo, side="left")


def accepted_mask(store: Store, ids: np.ndarray, stats: LookupStats | None = None) -> np.ndarray:
    """Which of ``ids`` the index holds (already accepted), reading only the files and row
    groups whose id range holds one of them."""
    stats = stats if stats is not None else LookupStats()
    stats.ids = len(ids)
    out = np.zeros(len(ids), dtype=bool)
    if len(ids) == 0:
        return out
    files = store.derived(TABLE, "id-files", _files)
    if not files:
        return out
    q = np.unique(ids)
    hit = np.zeros(len(q), dtype=bool)
    stats.files = len(files)
    lo = np.array([f.lo for f in files], np.int64)
    hi = np.array([f.hi for f in files], np.int64)
    fs, root = store.filesystem()
    for i in np.flatnonzero(overlaps(q, lo, hi)).tolist():
        f = files[i]
        uri = f"{root}/{TABLE}/{f.path}" if store.is_local else f"{store.root}/{TABLE}/{f.path}"
        glo, ghi, gnb = _footer(uri, store.store_id)
        groups = np.flatnonzero(overlaps(q, glo, ghi))
        if not len(groups):
            continue
        stats.files_read += 1
        with fs.open_input_file(f"{root}/{TABLE}/{f.path}") as fh:
            pf = pq.ParquetFile(fh)
            for g in groups.tolist():  # one row group at a time: memory bounded by it
                have = pf.read_row_group(g, columns=["event_id"]).column(0).to_numpy()
                pos = np.minimum(np.searchsorted(have, q), len(have) - 1)
                hit |= have[pos] == q
                stats.row_groups_read += 1
                stats.bytes_read += int(gnb[g])
    return hit[np.searchsorted(q, ids)]


def merge_ids(store: Store, dt: DeltaTable | None = None) -> int:
    """Merge index files of one size class, eight at a time, while the result stays under
    :data:`MAX_FILE_ROWS` (a layout-only commit); returns the files merged. Amortized, each id
    is rewritten O(log) times; the log keeps O(log) small files. ``dt``: the index's latest
    version if the caller has it open (else opened here)."""
    dt = dt if dt is not None else store.open_table(TABLE)
    if dt is None:
        return 0
    by_class: dict[int, list[_IdFile]] = {}
    for f in _files(dt):
        if f.rows * MERGE_FANOUT <= MAX_FILE_ROWS:
            by_class.setdefault(int(math.log(max(f.rows, 1), MERGE_FANOUT)), []).append(f)
    merged = 0
    actions: list[AddAction | RemoveAction] = []
    ts = now_us() // 1000
    for _, group in sorted(by_class.items()):
        while len(group) >= MERGE_FANOUT:
            take, group = group[:MERGE_FANOUT], group[MERGE_FANOUT:]
            parts = [_read_id_columns(store, TABLE, f.path) for f in take]
            ids = np.concatenate([p[0] for p in parts])
            users = np.concatenate([p[1] for p in parts])
            o = np.argsort(ids, kind="stable")
            actions.append(_write_file(store, ids[o], users[o], data_change=False))
            actions += [RemoveAction(f.path, False, ts, f.size, {}) for f in take]
            merged += len(take)
    if actions:
        _commit(store, actions, op="merge_ids", txn=None, metadata={"files_in": merged}, dt=dt)
    return merged


def index_dataset(store: Store) -> pads.Dataset | None:
    """The index as a dataset (tests, ``lmat info``)."""
    dt = store.open_table(TABLE)
    return delta_dataset(dt) if dt is not None else None
