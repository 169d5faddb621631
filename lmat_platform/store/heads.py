"""Head summaries extended snapshot by snapshot: publish costs the new events, not the history.

A head summary (``heads/``: per user and snapshot) holds the head's length, its checksum and
*length markers*. Publishing snapshot k used to re-read every touched user's whole history to
compute them; here each is extended from the user's previous summary with the snapshot's new
events only:

- ``head_len`` is the previous length plus the new events;
- ``head_checksum`` is the wrapping sum of per-event fingerprints
  (:func:`lmat_platform.hashing.event_fingerprint`): a function of the head's event set, which
  fixes its ``(event_ts, event_id)`` order, so the previous checksum plus the new events' sum is
  exactly the checksum of the merged head, wherever late events land in it;
- ``markers[j]`` is a lower bound of the ``event_ts`` of the head's ``MARKER_LENGTHS[j]``-th last
  event (``NO_MARKER``: the head is shorter, or it is within the slack below: read it all). The reader only needs a lower bound
  (rows older than it cannot be among the last L; it still cuts to L itself). Each marker
  carries its *count*, the number of head events at or after it. Extending: a previous marker's
  count grows by the new events at or after it; a new event is a candidate with the new events
  after it plus what the previous markers guarantee; each length takes the newest candidate
  whose count reaches it. When no candidate's count is within its *slack* (twice its length,
  or one row group of the tier if that is more: the reader reads whole row groups, so more
  precision saves it nothing) the marker went stale (the user's new events outran it): the
  user's recent rows, from the marker of the next longer length on, are read from the tier and
  its markers recomputed exactly. A length's marker goes stale only after about its slack in
  new events of the user, and its refresh reads about twice that: amortized, a constant number
  of rows per new event, whatever the history holds (and with 8,192-row row groups, a user
  needs thousands of new events before any refresh).

The state extended from is ``heads_latest/`` (Delta, partitioned by bucket): each user's newest
summary with its marker counts. Every file is sorted by user, in row groups of
:data:`LATEST_ROW_GROUP` rows, so publish reads only the touched users' previous rows: the files
whose ``user_id`` range (Delta log statistics) and then the row groups whose range (footer
statistics) holds a touched user; its cost follows the touched users, not the users (or events)
the store holds. Publish appends one file per bucket with the touched users' new rows, and a
bucket folds its newest files to one row per user (:func:`fold_due`, :func:`fold_from`) when its
files outnumber :data:`LATEST_FOLD_FILES` or its newer files hold as many rows as its oldest
(when most of a bucket's users are touched every hour, publish would otherwise read the same
users in every file). Tiered by size: file i and every newer one are folded when file i holds no
more rows than the newer ones together, so a row is rewritten O(log) times and a fold reads
about what was appended since the last one. The reader never reads it.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import WriterProperties
from numba import njit

from lmat_platform.hashing import as_signed, event_fingerprint
from lmat_platform.store import uih
from lmat_platform.store.core import Store, delta_dataset
from lmat_platform.store.idindex import overlaps

log = logging.getLogger(__name__)

#: Head lengths at which a marker is kept: ``markers[i]`` bounds the ``event_ts`` of the
#: ``MARKER_LENGTHS[i]``-th last event of the head (``NO_MARKER`` if the head is shorter).
MARKER_LENGTHS = tuple(2**i for i in range(6, 18))
NO_MARKER = np.iinfo(np.int64).min
LATEST = "heads_latest"
LATEST_APP = "lmat-heads-latest"
#: A bucket of ``heads_latest`` with more files than this folds its newest files.
LATEST_FOLD_FILES = 16
#: Rows per row group of ``heads_latest`` files (each sorted by user): the unit publish reads.
LATEST_ROW_GROUP = 512
#: A marker is stale when its count exceeds this many times its length.
STALE_FACTOR = 2

_NM = len(MARKER_LENGTHS)


@njit(cache=True, nogil=True)
def _first_ge(a, lo, hi, x):  # type: ignore[no-untyped-def,unused-ignore]
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _extend(ranks, slack, plen, pmark, pcnt, nts, nstart, nend):  # type: ignore[no-untyped-def,unused-ignore]
    """Per user: new length, markers, counts, and whether a refresh is needed (and from when):
    a length's marker is stale when its count exceeds ``slack`` for that length.

    ``pmark``/``pcnt``: previous markers and counts (count <= 0: none); ``nts[nstart:nend]``
    the user's new events' times, ascending."""
    U = len(plen)
    R = len(ranks)
    i64min = np.iinfo(np.int64).min
    mark = np.full((U, R), i64min, dtype=np.int64)
    cnt = np.zeros((U, R), dtype=np.int64)
    stale = np.zeros(U, dtype=np.bool_)
    cutoff = np.full(U, i64min, dtype=np.int64)
    for u in range(U):
        a, b = nstart[u], nend[u]
        n = b - a
        total = plen[u] + n
        # Candidates: previous markers with their counts grown by the new events at or after
        # them, and new events with the new events after them plus the previous guarantee.
        cm = np.empty(R + n + 1, dtype=np.int64)
        cc = np.empty(R + n + 1, dtype=np.int64)
        # The whole head is always a candidate (no marker: read it all), counting every event.
        cm[0] = i64min
        cc[0] = total
        k = 1
        for j in range(R):
            if pcnt[u, j] > 0 and pmark[u, j] > i64min:
                cm[k] = pmark[u, j]
                cc[k] = pcnt[u, j] + (b - _first_ge(nts, a, b, pmark[u, j]))
                k += 1
        for i in range(a, b):
            if i + 1 < b and nts[i + 1] == nts[i]:
                continue  # one candidate per distinct time: its last occurrence counts all
            x = nts[i]
            g = 0
            for j in range(R):
                if pcnt[u, j] > 0 and pmark[u, j] > i64min and pmark[u, j] >= x \
                        and pcnt[u, j] > g:
                    g = pcnt[u, j]
            cm[k] = x
            cc[k] = (b - _first_ge(nts, a, b, x)) + g
            k += 1
        worst = -1
        for j in range(R):
            m = ranks[j]
            if total < m:
                break
            best = 0  # the whole head: total >= m
            for c in range(1, k):
                if cc[c] >= m and (cm[c] > cm[best] or (cm[c] == cm[best] and cc[c] > cc[best])):
                    best = c
            if cc[best] > slack[j]:
                worst = j
            mark[u, j] = cm[best]
            cnt[u, j] = cc[best]
        if worst >= 0:
            stale[u] = True
            # Read from the marker of the next longer length if it is fresh (within its
            # slack), else the whole history.
            nxt = worst + 1
            if nxt < R and cnt[u, nxt] > 0 and cnt[u, nxt] <= slack[nxt]:
                cutoff[u] = mark[u, nxt]
    return mark, cnt, stale, cutoff


@njit(cache=True, nogil=True)
def _exact(ranks, ts, start, end, mark, cnt, rows):  # type: ignore[no-untyped-def,unused-ignore]
    """Exact markers of refreshed users from their rows ``ts[start:end]`` (ascending: the
    user's events at or after its cutoff), for the lengths those rows cover."""
    for u in range(len(rows)):
        a, b = start[u], end[u]
        n = b - a
        for j in range(len(ranks)):
            m = ranks[j]
            if m > n:
                break
            x = ts[b - m]
            mark[rows[u], j] = x
            cnt[rows[u], j] = b - _first_ge(ts, a, b, x)


def marker_slack(row_group_rows: int) -> np.ndarray:
    """The most head events a length's marker may count before it is refreshed: twice the
    length, or a row group of the tier if that is more (the reader reads whole row groups, so
    a marker more precise than a row group saves it nothing)."""
    return np.maximum(STALE_FACTOR * np.array(MARKER_LENGTHS, dtype=np.int64), row_group_rows)


def warm_kernels() -> None:
    """Load (or compile) this module's kernels now, on tiny inputs: a process's first call
    otherwise pays numba's cache load (about 1.5 s here) inside its first publish."""
    ranks = np.array(MARKER_LENGTHS, dtype=np.int64)
    z = np.zeros(1, np.int64)
    mark, cnt, _, _ = _extend(ranks, 2 * ranks, z, np.zeros((1, _NM), np.int64),
                              np.zeros((1, _NM), np.int64), z, z, np.ones(1, np.int64))
    _exact(ranks, z, z, z, mark, cnt, z)


def _empty_latest() -> pa.Table:
    return pa.table({
        "bucket": pa.array([], pa.int32()), "user_id": pa.array([], pa.int64()),
        "snapshot_id": pa.array([], pa.int32()), "head_len": pa.array([], pa.int64()),
        "head_checksum": pa.array([], pa.int64()), "markers": pa.array([], pa.list_(pa.int64())),
        "marker_counts": pa.array([], pa.list_(pa.int64())),
    })


def _list_col(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), _NM).cast(pa.list_(pa.int64()))


def _stat_col(t: pa.Table, name: str, default: int) -> np.ndarray:
    """A statistics column of the Delta log's add actions (``default`` where absent)."""
    if name not in t.column_names:
        return np.full(t.num_rows, default, np.int64)
    return np.array([default if v is None else int(v) for v in t.column(name).to_pylist()],
                    np.int64)


def _latest_rows(store: Store, ubucket: np.ndarray, before: int, users: np.ndarray,
                 stats: dict[str, int] | None = None) -> pa.Table:
    """The newest summary before snapshot ``before`` of each of ``users`` (``ubucket``: each
    one's bucket) that has one, with counts. Reads only the files, then the row groups, whose
    ``user_id`` range holds one of their bucket's ``users`` (``stats``: counts
    ``latest_files_read`` and ``latest_rows_read``). ``users`` are in (bucket, user) order, as
    :func:`extend_heads` finds them: each bucket's are one sorted slice."""
    dt = store.open_table(LATEST)
    if dt is None:
        return _bootstrap(store, np.unique(ubucket), before)
    stats = stats if stats is not None else {}
    acts = pa.table(dt.get_add_actions(flatten=True))
    i64 = np.iinfo(np.int64)
    fb = _stat_col(acts, "partition.bucket", -1)
    flo = _stat_col(acts, "min.user_id", i64.min)
    fhi = _stat_col(acts, "max.user_id", i64.max)
    fsn = _stat_col(acts, "min.snapshot_id", i64.min)
    fs, root = store.filesystem()
    paths = acts.column("path").to_pylist() if acts.num_rows else []
    assert not len(ubucket) or bool(np.all(ubucket[1:] >= ubucket[:-1]))
    # Each file's bucket's users: a slice (not a pass over every user per file).
    b_lo = np.searchsorted(ubucket, fb, side="left")
    b_hi = np.searchsorted(ubucket, fb, side="right")
    parts = []
    for i in range(acts.num_rows):
        q = users[b_lo[i]:b_hi[i]]
        if fsn[i] >= before or not overlaps(q, flo[i:i + 1], fhi[i:i + 1])[0]:
            continue
        with fs.open_input_file(f"{root}/{LATEST}/{paths[i]}") as fh:
            pf = pq.ParquetFile(fh)
            md = pf.metadata
            ci = next(c for c in range(md.num_columns) if md.schema.column(c).path == "user_id")
            lo = np.full(md.num_row_groups, i64.min, np.int64)
            hi = np.full(md.num_row_groups, i64.max, np.int64)
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(ci).statistics
                if st is not None and st.has_min_max:
                    lo[g], hi[g] = st.min, st.max
            groups = np.flatnonzero(overlaps(q, lo, hi)).tolist()
            if not groups:
                continue
            t = pf.read_row_groups(groups)
        stats["latest_files_read"] = stats.get("latest_files_read", 0) + 1
        stats["latest_rows_read"] = stats.get("latest_rows_read", 0) + t.num_rows
        t = t.filter(pa.array(t.column("snapshot_id").to_numpy() < before))
        parts.append(t.append_column("bucket", pa.array(np.full(t.num_rows, fb[i], np.int32))))
    if not parts:
        return _empty_latest()
    return _newest_per_user(pa.concat_tables(parts, promote_options="permissive"), users)


def _newest_per_user(t: pa.Table, users: np.ndarray | None = None) -> pa.Table:
    """Each user's row with the highest snapshot (only ``users``' if given): the order is
    found on the two key columns, and only the rows kept are gathered."""
    if t.num_rows == 0:
        return t
    u = t.column("user_id").to_numpy()
    sn = t.column("snapshot_id").to_numpy()
    idx = np.arange(len(u))
    if users is not None:
        idx = idx[np.isin(u, users)]
    o = idx[np.lexsort((sn[idx], u[idx]))]
    uo = u[o]
    last = o[np.flatnonzero(np.r_[uo[1:] != uo[:-1], True])] if len(o) else o
    return t.take(pa.array(last))


def _bootstrap(store: Store, buckets: np.ndarray, before: int) -> pa.Table:
    """A store published before ``heads_latest`` existed: its ``heads`` rows, newest per user
    (their markers were exact: each count is at least its length)."""
    dt = store.open_table("heads")
    if dt is None:
        return _empty_latest()
    f = pads.field("bucket").isin(pa.array(buckets.astype(np.int32))) & (
        pads.field("snapshot_id") < before)
    t = _newest_per_user(delta_dataset(dt).to_table(
        columns=["bucket", "user_id", "snapshot_id", "head_len", "head_checksum", "markers"],
        filter=f))
    if t.num_rows == 0:
        return _empty_latest()
    mk = t.column("markers").combine_chunks().flatten().to_numpy().reshape(t.num_rows, _NM)
    counts = np.where(mk == NO_MARKER, 0, np.array(MARKER_LENGTHS, dtype=np.int64)[None, :])
    return t.append_column("marker_counts", _list_col(counts))


def extend_heads(store: Store, k: int, new: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Head summaries at snapshot k of every user with events in ``new`` (snapshot k's events:
    ``bucket``, ``user_id``, ``event_ts``, ``event_id``), extended from each user's previous
    summary. Returns (rows for ``heads``, rows for ``heads_latest``, counters)."""
    stats = {"users": 0, "new_events": new.num_rows, "refreshed_users": 0, "rows_read": 0,
             "latest_files_read": 0, "latest_rows_read": 0}
    if new.num_rows == 0:
        return _empty_latest().drop_columns(["marker_counts"]), _empty_latest(), stats
    new = new.select(["bucket", "user_id", "event_ts", "event_id"]).sort_by(
        [("bucket", "ascending"), ("user_id", "ascending"), ("event_ts", "ascending"),
         ("event_id", "ascending")])
    nb = new.column("bucket").to_numpy()
    nu = new.column("user_id").to_numpy()
    nts = new.column("event_ts").to_numpy()
    fp = event_fingerprint(new.column("event_id").to_numpy(), nts)
    first = np.flatnonzero(np.r_[True, (nu[1:] != nu[:-1]) | (nb[1:] != nb[:-1])])
    nstart = first
    nend = np.r_[first[1:], len(nu)]
    users, ubucket = nu[first], nb[first]
    U = len(users)
    stats["users"] = U
    with np.errstate(over="ignore"):
        cs_new = np.add.reduceat(fp, first) if U else np.zeros(0, np.uint64)

    # Previous summaries, aligned to (bucket, user) order.
    prev = _latest_rows(store, ubucket, k, users, stats)
    plen = np.zeros(U, np.int64)
    pcs = np.zeros(U, np.uint64)
    pmark = np.full((U, _NM), NO_MARKER, np.int64)
    pcnt = np.zeros((U, _NM), np.int64)
    if prev.num_rows:
        pu = prev.column("user_id").to_numpy()
        o = np.argsort(pu, kind="stable")
        pu = pu[o]
        pos = np.minimum(np.searchsorted(pu, users), len(pu) - 1)
        has = pu[pos] == users
        src = o[pos[has]]
        plen[has] = prev.column("head_len").to_numpy()[src]
        pcs[has] = prev.column("head_checksum").to_numpy()[src].view(np.uint64)
        pm = prev.column("markers").combine_chunks().flatten().to_numpy().reshape(-1, _NM)
        pc = prev.column("marker_counts").combine_chunks().flatten().to_numpy().reshape(-1, _NM)
        pmark[has] = pm[src]
        pcnt[has] = pc[src]
    ranks = np.array(MARKER_LENGTHS, dtype=np.int64)
    mark, cnt, stale, cutoff = _extend(ranks, marker_slack(store.config.row_group_rows), plen,
                                       pmark, pcnt, nts, nstart, nend)

    # Stale markers: recompute exactly from the user's recent rows in the tier (snapshot <= k).
    rows = np.flatnonzero(stale)
    stats["refreshed_users"] = len(rows)
    if len(rows):
        dt = store.open_table("uih")
        files = uih.list_files(dt) if dt is not None else []
        for b in np.unique(ubucket[rows]).tolist():
            sel = rows[ubucket[rows] == b]
            o = np.argsort(users[sel], kind="stable")
            sel = sel[o]
            br = uih.read_bucket(
                store, [f for f in files if f.bucket == b], users=users[sel],
                cutoffs=cutoff[sel], columns=["event_ts"], actions=None, max_snapshot=k)
            ru = br.table.column("user_id").to_numpy()
            rts = br.table.column("event_ts").to_numpy()
            stats["rows_read"] += len(ru)
            s = np.searchsorted(ru, users[sel], side="left")
            e = np.searchsorted(ru, users[sel], side="right")
            _exact(ranks, rts, s, e, mark, cnt, sel)
    lens = plen + (nend - nstart)
    with np.errstate(over="ignore"):
        csum = pcs + cs_new
    base = {
        "bucket": pa.array(ubucket.astype(np.int32)),
        "user_id": pa.array(users),
        "snapshot_id": pa.array(np.full(U, k, dtype=np.int32)),
        "head_len": pa.array(lens),
        "head_checksum": pa.array(as_signed(csum)),
        "markers": _list_col(mark),
    }
    heads = pa.table(base)
    latest = pa.table({**base, "marker_counts": _list_col(cnt)})
    return heads, latest, stats


def _latest_writer() -> WriterProperties:
    return WriterProperties(max_row_group_size=LATEST_ROW_GROUP, compression="ZSTD")


def write_latest(store: Store, k: int, latest: pa.Table) -> None:
    """Append snapshot k's newest summaries (sorted by bucket and user) to ``heads_latest``
    (app transaction ``k``), then fold buckets with too many files."""
    dt = store.open_table(LATEST)
    if dt is not None and (dt.transaction_version(LATEST_APP) or -1) >= k:
        return
    store.append(LATEST, latest, op="heads_latest", partition_by=["bucket"],
                 txn=(LATEST_APP, k), metadata={"snapshot_id": k},
                 writer_properties=_latest_writer())
    _fold(store)


def fold_due(rows: np.ndarray) -> bool:
    """Whether a bucket whose files hold ``rows`` (oldest first) is folded: more than
    :data:`LATEST_FOLD_FILES` files, or newer files holding together as many rows as the oldest
    (publish reads every file that holds a touched user: a few files, then, cost more to read
    than to fold)."""
    return len(rows) > LATEST_FOLD_FILES or (len(rows) > 1 and rows[0] <= rows[1:].sum())


def fold_from(rows: np.ndarray) -> int:
    """Which files of a bucket to fold, given their rows oldest first: from the oldest file
    holding no more rows than all newer files together (at least the newest two), so that the
    files kept grow geometrically with age and each fold reads about what came after the last."""
    tail = 0
    start = max(len(rows) - 2, 0)
    for i in range(len(rows) - 1, -1, -1):
        if rows[i] <= tail:
            start = min(start, i)
        tail += int(rows[i])
    return start


def _fold(store: Store) -> None:
    """Fold the newest files of each bucket of ``heads_latest`` that :func:`fold_due` says
    (from :func:`fold_from` on) to one row per user, in one commit: an overwrite of each such
    bucket's rows from its first folded file's oldest snapshot on, which are all read first,
    whichever files hold them (a reader of the old version keeps its files until vacuum)."""
    dt = store.open_table(LATEST)
    if dt is None:
        return
    t = pa.table(dt.get_add_actions(flatten=True))
    if t.num_rows == 0:
        return
    b = _stat_col(t, "partition.bucket", -1)
    first = _stat_col(t, "min.snapshot_id", np.iinfo(np.int64).min)
    nrec = _stat_col(t, "num_records", 0)
    due: list[tuple[int, int]] = []
    for bucket in np.unique(b).tolist():
        idx = np.flatnonzero(b == bucket)
        idx = idx[np.argsort(first[idx], kind="stable")]
        if fold_due(nrec[idx]):
            due.append((int(bucket), int(first[idx[fold_from(nrec[idx])]])))
    if not due:
        return
    f = None
    for bucket, lo in due:
        g = (pads.field("bucket") == bucket) & (pads.field("snapshot_id") >= lo)
        f = g if f is None else f | g
    rows = _newest_per_user(delta_dataset(dt).to_table(filter=f))  # sorted by user
    store.append(LATEST, rows, op="fold_heads_latest", mode="overwrite",
                 predicate=" OR ".join(f"(bucket = {bucket} AND snapshot_id >= {lo})"
                                       for bucket, lo in due),
                 metadata={"buckets": len(due)}, writer_properties=_latest_writer())
