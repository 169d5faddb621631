"""Snapshots (spec section 3): the registry, publishing, and the per-user head summaries.

Publishing snapshot k with watermark W_k appends the raw events with
``W_{k-1} <= arrival_ts < W_k`` to the UIH tier (one sorted file per bucket), then records, for
every user it touched, the head at k: its length, its checksum and *length markers* (the
``event_ts`` of the 64th, 128th, ... last event), and finally appends the registry row, which is
the commit point. Each step is one Delta commit tagged with app transaction ``(step, k)``, so a
publish killed part way is finished by running it again with the same watermark.

Before its first step a publish records its *intent* (snapshot k, watermark W_k) in the
``publishing`` table. Ingest fences at :func:`ingest_fence`, the highest watermark registered
*or* intended, so a row that arrives while a publish is unfinished (running, or killed and not
yet re-run) and belongs below its watermark is quarantined ``behind_watermark`` instead of being
accepted into a range the publish has already copied (spec section 3). Because ingest quarantines
every row with ``arrival_ts`` below that fence, the raw events of a published range never change
and the tier only ever grows by appends.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

from lmat_platform.engines import Engine, LocalEngine, is_local
from lmat_platform.engines.files import Part, commit_adds, commit_properties, split_by, write_part
from lmat_platform.exceptions import WatermarkError
from lmat_platform.hashing import as_signed, event_fingerprint
from lmat_platform.store.core import Store, as_store, checkpoint_if_due, now_us

log = logging.getLogger(__name__)

# The tier (uih) and the head summaries (heads) define compiled kernels: they are imported by
# the functions that publish or read them, so that reading the registry (``lmat info``, the
# ingest fence) does not load numba.


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: int
    watermark: int
    published_at: int
    uih_version: int
    events: int
    created_at: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def list_snapshots(store: Store | str) -> list[SnapshotInfo]:
    """Every published snapshot, oldest first."""
    return snapshots_of(as_store(store).read_table("snapshots"))


def snapshots_of(t: pa.Table | None) -> list[SnapshotInfo]:
    """The snapshots in rows of the registry, oldest first."""
    if t is None or t.num_rows == 0:
        return []
    rows = sorted(t.to_pylist(), key=lambda r: r["snapshot_id"])
    return [SnapshotInfo(**{k: r[k] for k in SnapshotInfo.__dataclass_fields__}) for r in rows]


def latest_snapshot(store: Store | str) -> SnapshotInfo | None:
    snaps = list_snapshots(store)
    return snaps[-1] if snaps else None


#: The table of publish intents: one row per snapshot whose publish has started.
PUBLISHING_TABLE = "publishing"
_INTENT_SCHEMA = pa.schema(
    [
        ("snapshot_id", pa.int32()),
        ("watermark", pa.int64()),
        ("published_at", pa.int64()),
        ("started_at", pa.int64()),
    ]
)


def publish_intents(store: Store | str) -> dict[int, int]:
    """Watermark of every publish that has started, by snapshot id (finished ones included)."""
    t = as_store(store).read_table(PUBLISHING_TABLE, columns=["snapshot_id", "watermark"])
    if t is None or t.num_rows == 0:
        return {}
    return dict(zip(t.column("snapshot_id").to_pylist(), t.column("watermark").to_pylist(),
                    strict=True))


def ingest_fence(store: Store | str) -> int | None:
    """The watermark ingest quarantines below (spec sections 2 and 3): the newest registered
    snapshot's, or an unfinished publish's if higher (None: nothing published or started)."""
    store = as_store(store)
    snap = latest_snapshot(store)
    marks = list(publish_intents(store).values())
    if snap is not None:
        marks.append(snap.watermark)
    return max(marks) if marks else None


def snapshot_arrays(snaps: list[SnapshotInfo]) -> tuple[np.ndarray, np.ndarray]:
    """(published_at, watermark) arrays indexed by snapshot id."""
    p = np.array([s.published_at for s in snaps], dtype=np.int64)
    w = np.array([s.watermark for s in snaps], dtype=np.int64)
    return p, w


def resolve_snapshot(published_at: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
    """Newest snapshot with ``P_S <= T`` for each request (-1 if none); P is non-decreasing."""
    return (np.searchsorted(published_at, request_ts, side="right") - 1).astype(np.int32)


def publish_snapshot(
    store: Store | str, watermark: int, *, published_at: int | None = None,
    engine: Engine | None = None,
) -> SnapshotInfo:
    """Publish the next snapshot (spec section 3). ``published_at`` defaults to the watermark;
    ``engine`` writes the tier's files (:mod:`lmat_platform.engines`; None: this process)."""
    from lmat_platform.store import uih

    store = as_store(store)
    if published_at is None:
        published_at = watermark
    with store.write_lock():
        snaps = list_snapshots(store)
        prev = snaps[-1] if snaps else None
        if published_at < watermark:
            raise WatermarkError(
                f"--published-at {published_at} is before --watermark {watermark} (need P >= W)"
            )
        if prev is not None and watermark <= prev.watermark:
            raise WatermarkError(
                f"--watermark {watermark} does not increase: snapshot {prev.snapshot_id} "
                f"has watermark {prev.watermark}"
            )
        if prev is not None and published_at < prev.published_at:
            raise WatermarkError(
                f"--published-at {published_at} is before snapshot {prev.snapshot_id}'s "
                f"publish time {prev.published_at}"
            )
        k = prev.snapshot_id + 1 if prev else 0
        lo = prev.watermark if prev else None
        intended = publish_intents(store).get(k)
        if intended is None:
            # The intent lands before anything else of this publish: from here on ingest
            # fences at this watermark, until the publish is finished (by this run or a re-run).
            store.append(
                PUBLISHING_TABLE,
                pa.Table.from_pylist(
                    [{"snapshot_id": k, "watermark": watermark, "published_at": published_at,
                      "started_at": now_us()}],
                    schema=_INTENT_SCHEMA,
                ),
                op="publish_intent",
                txn=("lmat-publish-intent", k),
                metadata={"snapshot_id": k, "watermark": watermark},
            )
        elif intended != watermark:
            raise WatermarkError(
                f"snapshot {k} was interrupted at --watermark {intended}; run "
                f"'lmat snapshot' with --watermark {intended} to finish it"
            )
        tier = store.open_table("uih")
        done = tier.transaction_version("lmat-publish") if tier is not None else None
        if done is not None and done >= k:
            # A previous run of this publish committed the tier step and died: finish it, but
            # only for the same watermark (the rows it appended were cut at that watermark).
            hist = [h for h in tier.history() if h.get("lmat.snapshot_id") == str(k)]  # type: ignore[union-attr]
            wm = int(hist[0]["lmat.watermark"]) if hist else None
            if wm != watermark:
                raise WatermarkError(
                    f"snapshot {k} was interrupted at --watermark {wm}; run "
                    f"'lmat snapshot' with --watermark {wm} to finish it"
                )
            n_events = int(hist[0].get("lmat.events", 0))
            version = tier.version()  # type: ignore[union-attr]
            changed = None
        else:
            delta = _raw_range(store, lo, watermark)
            n_events = delta.num_rows
            if n_events:
                delta = delta.drop_columns([c for c in ("source", "batch_id") if c in delta.column_names])
                delta = delta.append_column(
                    "snapshot_id", pa.array(np.full(n_events, k, dtype=np.int32))
                )
                adds = uih.write_files(store, delta, prefix=f"g-{k:06d}", data_change=True,
                                       engine=engine)
                version = uih.commit(
                    store,
                    adds,
                    uih.tier_schema(delta.schema),
                    op="publish",
                    metadata={"snapshot_id": k, "watermark": watermark, "events": n_events},
                    txn=("lmat-publish", k),
                )
            else:
                version = tier.version() if tier is not None else -1
            changed = (delta.select(["bucket", "user_id", "event_ts", "event_id"])
                       if n_events else None)
        _write_heads(store, k, changed, engine)
        info = SnapshotInfo(k, watermark, published_at, version, n_events, now_us())
        store.append(
            "snapshots",
            pa.Table.from_pylist(
                [info.as_dict()],
                schema=pa.schema(
                    [
                        ("snapshot_id", pa.int32()),
                        ("watermark", pa.int64()),
                        ("published_at", pa.int64()),
                        ("uih_version", pa.int64()),
                        ("events", pa.int64()),
                        ("created_at", pa.int64()),
                    ]
                ),
            ),
            op="register_snapshot",
            txn=("lmat-snapshot", k),
        )
    log.info("published snapshot %d (watermark %d, %d events)", k, watermark, n_events)
    return info


def _raw_range(store: Store, lo: int | None, hi: int) -> pa.Table:
    raw = store.open_table("raw")
    if raw is None:
        return pa.table({"bucket": pa.array([], pa.int32()), "user_id": pa.array([], pa.int64())})
    f = pads.field("arrival_ts") < hi
    if lo is not None:
        f &= pads.field("arrival_ts") >= lo
    # Only the files whose arrival range meets [lo, hi) (from the log's statistics): publish
    # costs the new events, however many older ones the raw log still holds.
    from lmat_platform.store.retention import raw_range_dataset

    return raw_range_dataset(store, raw, lo, hi).to_table(filter=f)


def _write_heads(
    store: Store, k: int, changed: pa.Table | None, engine: Engine | None = None
) -> None:
    """Record the head at snapshot k of every user snapshot k touched, extended from each
    user's previous summary with snapshot k's events only (:mod:`lmat_platform.store.heads`):
    ``heads`` rows for readers, then each user's newest summary in ``heads_latest``. Each is
    one commit with app transaction k; a resumed publish computes them again (the result is a
    function of the previous summaries and the tier, both unchanged) and writes what is missing.
    ``engine`` (Ray): one task per bucket extends that bucket's summaries and writes its files.
    """
    from lmat_platform.store import heads as heads_mod

    hd = store.open_table("heads")
    lt = store.open_table(heads_mod.LATEST)
    heads_done = hd is not None and (hd.transaction_version("lmat-heads") or -1) >= k
    latest_done = lt is not None and (lt.transaction_version(heads_mod.LATEST_APP) or -1) >= k
    if heads_done and latest_done:
        return
    if changed is None:
        changed = _tier_rows_of(store, k)
    if not is_local(engine) and changed.num_rows:
        _write_heads_parts(store, k, changed, engine, heads_done, latest_done)
        return
    heads_rows, latest_rows, stats = heads_mod.extend_heads(store, k, changed)
    log.info("heads of snapshot %d: %s", k, stats)
    if not heads_done:
        store.append("heads", heads_rows, op="heads", partition_by=["bucket"],
                     txn=("lmat-heads", k), metadata=_heads_metadata(stats))
    if not latest_done:
        heads_mod.write_latest(store, k, latest_rows)


def _heads_metadata(stats: dict[str, int]) -> dict[str, object]:
    """The counters of :func:`heads.extend_heads` a ``heads`` commit records."""
    return {key: stats[key] for key in ("refreshed_users", "rows_read", "latest_rows_read",
                                        "users")}


def _write_heads_parts(
    store: Store, k: int, changed: pa.Table, engine: Engine | None, heads_done: bool,
    latest_done: bool,
) -> None:
    """:func:`_write_heads` with one ``engine`` task per bucket: each extends its bucket's
    summaries and writes its ``heads`` and ``heads_latest`` files; the driver commits each
    table's files in one commit (the local engine's commits, app transactions and rows)."""
    from lmat_platform.store import heads as heads_mod

    want = (not heads_done, not latest_done)
    schemas = {n: pa.schema(t.schema().to_arrow()) if (t := store.open_table(n)) is not None
               else None for n in ("heads", heads_mod.LATEST)}
    got = (engine or LocalEngine()).map(
        _heads_bucket, [(store, k, part, want, schemas) for _, part in split_by(changed, "bucket")])
    stats = {key: sum(g[2][key] for g in got) for key in got[0][2]}
    log.info("heads of snapshot %d: %s", k, stats)
    first = got[0][3]
    if not heads_done:
        _commit_parts(store, "heads", [g[0] for g in got], first[0], op="heads",
                      txn=("lmat-heads", k), metadata=_heads_metadata(stats))
    if not latest_done:
        _commit_parts(store, heads_mod.LATEST, [g[1] for g in got], first[1], op="heads_latest",
                      txn=(heads_mod.LATEST_APP, k), metadata={"snapshot_id": k})
        heads_mod._fold(store)  # as write_latest does after its append


def _commit_parts(
    store: Store, name: str, adds: list, schema: pa.Schema, *, op: str, txn: tuple[str, int],
    metadata: dict[str, object],
) -> None:
    """One commit of a table partitioned by bucket with the files tasks wrote."""
    dt = store.open_table(name)
    out = commit_adds(dt if dt is not None else store.table_uri(name), adds, schema,
                      partition_by=["bucket"], props=commit_properties(op, metadata, txn))
    checkpoint_if_due(out)


def _heads_bucket(
    item: tuple[Store, int, pa.Table, tuple[bool, bool], dict[str, pa.Schema | None]],
) -> tuple[AddAction | None, AddAction | None, dict[str, int], tuple[pa.Schema, pa.Schema]]:
    """One bucket's head summaries at snapshot k, written as its ``heads`` and
    ``heads_latest`` files (which of them ``want`` says); a task of any engine."""
    from lmat_platform.store import heads as heads_mod

    store, k, part, want, schemas = item
    heads_rows, latest_rows, stats = heads_mod.extend_heads(store, k, part)
    b = str(int(part.column("bucket")[0].as_py()))
    # heads_latest files as write_latest writes them: sorted by user, in small row groups.
    latest_opts = {"row_group_size": heads_mod.LATEST_ROW_GROUP, "compression": "zstd"}
    adds = [write_part(Part(store.table_uri(name), rows, (("bucket", b),), options=opts,
                            schema=schemas[name]))
            if w else None
            for name, rows, w, opts in (("heads", heads_rows, want[0], {}),
                                        (heads_mod.LATEST, latest_rows, want[1], latest_opts))]
    return adds[0], adds[1], stats, (heads_rows.schema, latest_rows.schema)


def _tier_rows_of(store: Store, k: int) -> pa.Table:
    """(bucket, user_id, event_ts, event_id) of snapshot k's tier rows (a resumed publish),
    from the files whose snapshot statistics can hold k."""
    from lmat_platform.store import uih

    cols = ["bucket", "user_id", "event_ts", "event_id"]
    dt = store.open_table("uih")
    if dt is None:
        return pa.table({c: pa.array([], pa.int32() if c == "bucket" else pa.int64())
                         for c in cols})
    fs, root = store.filesystem()
    parts = []
    for f in uih.list_files(dt):
        if f.min_snapshot is not None and f.max_snapshot is not None and not (
                f.min_snapshot <= k <= f.max_snapshot):
            continue
        with fs.open_input_file(f"{root}/uih/{f.path}") as fh:
            t = pq.read_table(fh, columns=["user_id", "event_ts", "event_id", "snapshot_id"])
        t = t.filter(pa.array(t.column("snapshot_id").to_numpy() == k)).drop_columns(
            ["snapshot_id"])
        parts.append(t.append_column(
            "bucket", pa.array(np.full(t.num_rows, f.bucket, dtype=np.int32))).select(cols))
    if not parts:
        return pa.table({c: pa.array([], pa.int32() if c == "bucket" else pa.int64())
                         for c in cols})
    return pa.concat_tables(parts)


def head_summaries(store: Store, bucket: int, users: np.ndarray, k: int) -> pa.Table:
    """Head length, checksum and exact markers at snapshot k for ``users`` of one bucket,
    recomputed from their whole histories (the reference :func:`_write_heads`'s extension is
    checked against; publish no longer calls it).

    Reads only ``user_id``, ``event_ts``, ``event_id`` of the row groups that hold those users.
    """
    from lmat_platform.store.heads import MARKER_LENGTHS, NO_MARKER

    users = np.sort(users)
    cols = read_user_keys(store, bucket, users, max_snapshot=k)
    u, ts, eid = cols["user_id"], cols["event_ts"], cols["event_id"]
    fp = event_fingerprint(eid, ts)
    starts = np.searchsorted(u, users, side="left")
    ends = np.searchsorted(u, users, side="right")
    lens = (ends - starts).astype(np.int64)
    csum = np.zeros(len(users), dtype=np.uint64)
    nz = lens > 0
    if nz.any():
        with np.errstate(over="ignore"):
            cs = np.concatenate([[np.uint64(0)], np.cumsum(fp, dtype=np.uint64)])
            csum[nz] = cs[ends[nz]] - cs[starts[nz]]
    markers = np.full((len(users), len(MARKER_LENGTHS)), NO_MARKER, dtype=np.int64)
    for j, m in enumerate(MARKER_LENGTHS):
        has = lens >= m
        markers[has, j] = ts[ends[has] - m]
    return pa.table(
        {
            "bucket": pa.array(np.full(len(users), bucket, dtype=np.int32)),
            "user_id": pa.array(users),
            "snapshot_id": pa.array(np.full(len(users), k, dtype=np.int32)),
            "head_len": pa.array(lens),
            "head_checksum": pa.array(as_signed(csum)),
            "markers": pa.FixedSizeListArray.from_arrays(
                pa.array(markers.ravel()), len(MARKER_LENGTHS)
            ).cast(pa.list_(pa.int64())),
        }
    )


def read_user_keys(
    store: Store, bucket: int, users: np.ndarray, *, max_snapshot: int
) -> dict[str, np.ndarray]:
    """(user_id, event_ts, event_id) of ``users`` (sorted) in one bucket, sorted, snapshot <= k."""
    from lmat_platform.store import uih

    dt = store.open_table("uih")
    keys = ["user_id", "event_ts", "event_id", "snapshot_id"]
    if dt is None:
        return {c: np.array([], dtype=np.int64) for c in keys}
    chunks = uih.read_user_row_groups(
        store, [f for f in uih.list_files(dt) if f.bucket == bucket], users, keys)
    if not chunks:
        return {c: np.array([], dtype=np.int64) for c in keys}
    t = pa.concat_tables(chunks)
    u = t.column("user_id").to_numpy()
    keep = np.isin(u, users) & (t.column("snapshot_id").to_numpy() <= max_snapshot)
    t = uih.sort_events(t.filter(pa.array(keep)))
    return {c: t.column(c).to_numpy() for c in keys}
