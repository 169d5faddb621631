"""Ingest of event files into the raw log and quarantine (spec section 2).

One file is one batch. A batch commits in three steps, each one Delta commit tagged with the
batch id (the file's content hash): quarantine rows, accepted rows, then the ingest record. The
ingest record is the commit point: a re-run of a batch without one completes the missing steps
(each step's app transaction tells whether it already landed) and a re-run with one is a no-op.
Readers only ever see the raw log, which gets the whole batch's accepted rows in one commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from lmat_platform.engines import Engine, LocalEngine
from lmat_platform.engines.files import append_parts
from lmat_platform.exceptions import SchemaError
from lmat_platform.hashing import bucket_of
from lmat_platform.schema import (
    EVENT_COLUMNS,
    check_trait_types,
    normalize_events,
    read_parquet_file,
)
from lmat_platform.store import idindex
from lmat_platform.store.core import Store, as_store, delta_dataset, now_us
from lmat_platform.store.snapshots import ingest_fence

log = logging.getLogger(__name__)

REASON_NULL = "null_required_column"
REASON_TS = "event_ts_after_arrival_ts"
REASON_WATERMARK = "behind_watermark"
REASONS = (REASON_NULL, REASON_TS, REASON_WATERMARK)


@dataclass
class IngestResult:
    """Counts of one ingest call (all files together)."""

    files: int = 0
    skipped_files: int = 0
    rows: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    version: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "skipped_files": self.skipped_files,
            "rows": self.rows,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "quarantined": dict(self.quarantined),
            "quarantined_total": sum(self.quarantined.values()),
            "version": self.version,
        }


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def classify(table: pa.Table, watermark: int | None) -> np.ndarray:
    """Pure: the quarantine reason index per row (-1 accepted candidate), in spec order."""
    n = table.num_rows
    reason = np.full(n, -1, dtype=np.int8)
    nulls = np.zeros(n, dtype=bool)
    for c in EVENT_COLUMNS:
        col = table.column(c)
        if col.null_count:
            nulls |= np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False))
    reason[nulls] = 0
    ok = ~nulls
    ets = table.column("event_ts").fill_null(0).to_numpy()
    ats = table.column("arrival_ts").fill_null(0).to_numpy()
    reason[ok & (ets > ats)] = 1
    if watermark is not None:
        reason[(reason == -1) & (ats < watermark)] = 2
    return reason


def _already_accepted(store: Store, ids: np.ndarray, *, exclude_batch: str) -> np.ndarray:
    """Mask of ``ids`` accepted by other batches, from the accepted-id index (its cost is the
    batch's, not the store's: :mod:`lmat_platform.store.idindex`). The index is first caught
    up with the raw log, so a batch whose raw commit landed before a kill is covered. A batch
    resumed after its own raw commit landed must not count its own rows as duplicates: its ids
    (rows of the raw log tagged with its ``batch_id``; read only on that rare path) are
    excluded, which gives the same decisions as its first run."""
    if len(ids) == 0:
        return np.zeros(0, dtype=bool)
    idindex.catch_up(store)
    stats = idindex.LookupStats()
    mask = idindex.accepted_mask(store, ids, stats)
    log.debug("duplicate check: %s", stats.as_dict())
    if mask.any() and store.txn_version("raw", f"lmat-ingest-{exclude_batch}") is not None:
        dt = store.open_table("raw")
        assert dt is not None
        own = delta_dataset(dt).to_table(
            columns=["event_id"], filter=pads.field("batch_id") == exclude_batch
        ).column("event_id").to_numpy()
        mask &= ~np.isin(ids, own)
    return mask


def _prepare(
    paths: Sequence[str], store: Store, engine: Engine | None = None
) -> list[tuple[str, pa.Table, str]]:
    """Read and check every file before anything is written (a bad file changes nothing):
    (path, normalized rows, batch id) per file; ``engine`` (Ray): one task per file reads,
    checks and hashes it."""
    raw = store.open_table("raw")
    stored = pa.schema(raw.schema().to_arrow()) if raw is not None else None
    read = (engine or LocalEngine()).map(_read_one, list(paths))
    seen: dict[str, pa.DataType] = {}
    out = []
    for p, (t, batch_id) in zip(paths, read, strict=True):
        if stored is not None:
            check_trait_types(t.schema, stored, where=p)
        for f in t.schema:
            if f.name in seen and seen[f.name] != f.type:
                raise SchemaError(
                    f"{p}: column '{f.name}' changed type from {seen[f.name]} to {f.type}"
                )
            seen[f.name] = f.type
        out.append((p, t, batch_id))
    return out


def _read_one(path: str) -> tuple[pa.Table, str]:
    """One event file's normalized rows and its batch id (a task of any engine)."""
    return normalize_events(read_parquet_file(path, what="event file"), where=path), \
        _file_hash(path)


def ingest_files(
    store: Store | str,
    paths: Sequence[str],
    *,
    progress: Callable[[str], None] | None = None,
    engine: Engine | None = None,
) -> IngestResult:
    """Ingest event Parquet files (spec section 2); one atomic, idempotent batch per file.
    ``engine`` (Ray): files are read and checked, and each batch's accepted rows written, by
    tasks (:mod:`lmat_platform.engines`); every commit is the driver's, as with None."""
    store = as_store(store)
    prepared = _prepare(paths, store, engine)
    result = IngestResult()
    with store.write_lock():
        for i, (path, table, batch_id) in enumerate(prepared):
            _ingest_one(store, path, table, result, batch_id=batch_id, engine=engine)
            if progress:
                progress(f"ingested {i + 1}/{len(prepared)} {os.path.basename(path)}")
    raw = store.open_table("raw")
    result.version = raw.version() if raw is not None else None
    return result


def _keys(event_id: pa.ChunkedArray, arrival_ts: pa.ChunkedArray) -> np.ndarray:
    """(event_id, arrival_ts) per row as one structured array (nulls as 0)."""
    k = np.empty(len(event_id), dtype=[("e", np.int64), ("t", np.int64)])
    k["e"] = event_id.fill_null(0).to_numpy()
    k["t"] = arrival_ts.fill_null(0).to_numpy()
    return k


def _first_of_each(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of ``a``: for each key, its first n occurrences in ``a`` (row order), n the
    times the key occurs in ``b`` (multiset matching, without a Python step per row)."""
    out = np.zeros(len(a), dtype=bool)
    if len(a) == 0 or len(b) == 0:
        return out
    ub, cnt = np.unique(b, return_counts=True)
    order = np.argsort(a, kind="stable")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]]
    rank = np.arange(len(s)) - np.flatnonzero(new)[np.cumsum(new) - 1]
    pos = np.minimum(np.searchsorted(ub, s), len(ub) - 1)
    n = np.where(ub[pos] == s, cnt[pos], 0)
    out[order[rank < n]] = True
    return out


def _reasons(
    store: Store, table: pa.Table, app_id: str, batch_id: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """The batch's quarantine reason per row (as :func:`classify`), which rows' quarantine rows
    already landed, and the version of the batch's last quarantine commit (0: none).

    A fresh batch is fenced at :func:`ingest_fence` (the newest watermark registered or
    intended by an unfinished publish, spec 3). A batch resumed after a kill keeps what landed:
    if its accepted rows are in the raw log, the run that wrote them decided (its
    ``behind_watermark`` rows are the ones in the quarantine); if not, the fence may have risen
    since its quarantine commit (a publish ran in between), and rows now behind it are added to
    the quarantine by a further commit instead of reaching the raw log behind a snapshot.
    """
    q_version = store.txn_version("quarantine", app_id) or 0
    raw_landed = store.txn_version("raw", app_id) is not None
    if not q_version and not raw_landed:
        return classify(table, ingest_fence(store)), np.zeros(table.num_rows, dtype=bool), 0
    reason = classify(table, None)  # null and time rules: the same in every run
    landed = reason >= 0 if q_version else np.zeros(table.num_rows, dtype=bool)
    if q_version:
        dt = store.open_table("quarantine")
        assert dt is not None
        f = (pads.field("batch_id") == batch_id) & (pads.field("reason") == REASON_WATERMARK)
        got = delta_dataset(dt).to_table(columns=["event_id", "arrival_ts"], filter=f)
        if got.num_rows:
            cand = np.flatnonzero(reason < 0)
            hit = cand[_first_of_each(
                _keys(table.column("event_id"), table.column("arrival_ts"))[cand],
                _keys(got.column("event_id"), got.column("arrival_ts")))]
            reason[hit], landed[hit] = 2, True
    if not raw_landed:
        fence = ingest_fence(store)
        if fence is not None:
            ats = table.column("arrival_ts").fill_null(0).to_numpy()
            reason[(reason == -1) & (ats < fence)] = 2
    return reason, landed, q_version


def _ingest_one(
    store: Store, path: str, table: pa.Table, result: IngestResult, *, batch_id: str,
    engine: Engine | None = None,
) -> None:
    app_id = f"lmat-ingest-{batch_id}"
    result.files += 1
    result.rows += table.num_rows
    if store.txn_version("ingests", app_id) is not None:
        log.info("%s: batch %s already ingested, skipping", path, batch_id)
        result.skipped_files += 1
        return
    reason, landed, q_version = _reasons(store, table, app_id, batch_id)

    # Quarantine: every rejected row, with its reason and where it came from.
    bad = np.flatnonzero((reason >= 0) & ~landed)
    counts = {r: int((reason == k).sum()) for k, r in enumerate(REASONS)}
    if len(bad):
        q = table.take(pa.array(bad))
        q = q.append_column("reason", pa.array(np.array(REASONS, dtype=object)[reason[bad]]))
        q = q.append_column("source", pa.array([os.path.basename(path)] * len(bad)))
        q = q.append_column("batch_id", pa.array([batch_id] * len(bad)))
        store.append("quarantine", q, op="quarantine", txn=(app_id, q_version + 1),
                     metadata={"batch": batch_id})

    # Accepted: first occurrence of each event_id wins; ids already in the raw log are dropped.
    cand = np.flatnonzero(reason < 0)
    ids = table.column("event_id").fill_null(0).to_numpy()[cand]
    _, first = np.unique(ids, return_index=True)
    keep = np.zeros(len(cand), dtype=bool)
    keep[first] = True
    keep &= ~_already_accepted(store, ids, exclude_batch=batch_id)
    dups = int(len(cand) - keep.sum())
    acc = table.take(pa.array(cand[keep]))
    if acc.num_rows and store.txn_version("raw", app_id) is None:
        users = acc.column("user_id").to_numpy()
        acc = acc.append_column("bucket", pa.array(bucket_of(users, store.n_buckets)))
        acc = acc.append_column("source", pa.array([os.path.basename(path)] * acc.num_rows))
        acc = acc.append_column("batch_id", pa.array([batch_id] * acc.num_rows))
        acc = acc.sort_by([("bucket", "ascending"), ("user_id", "ascending"),
                           ("event_ts", "ascending"), ("event_id", "ascending")])
        v = append_parts(store, "raw", acc, engine=engine, op="ingest", txn=(app_id, 1),
                         metadata={"batch": batch_id})
        # After the raw commit (the commit point); a kill before this lands is finished by the
        # next writer's catch-up (see idindex's crash ordering).
        idindex.add_ids(store, acc.column("event_id").to_numpy(),
                        acc.column("user_id").to_numpy(), raw_version=v)

    record = pa.table(
        {
            "batch_id": [batch_id],
            "source": [os.path.abspath(path)],
            "rows": pa.array([table.num_rows], pa.int64()),
            "accepted": pa.array([acc.num_rows], pa.int64()),
            "duplicates": pa.array([dups], pa.int64()),
            **{f"q_{r}": pa.array([counts[r]], pa.int64()) for r in REASONS},
            "ingested_at": pa.array([now_us()], pa.int64()),
        }
    )
    store.append("ingests", record, op="ingest_record", txn=(app_id, 1))
    result.accepted += acc.num_rows
    result.duplicates += dups
    for r in REASONS:
        result.quarantined[r] += counts[r]
    log.info("%s: accepted %d, duplicates %d, quarantined %s", path, acc.num_rows, dups, counts)
