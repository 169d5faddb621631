"""The reconstruction kernel: head via pointer + tail, merged, tenant projection (spec 4-6).

Works a bucket at a time, over all requests of the bucket at once: one pruned read of the
bucket's UIH files serves every request in it, the checks and head lookups are one compiled
pass (:func:`lmat_platform.kernels.request_heads`), and the per-request merge is one compiled
call (:func:`lmat_platform.kernels.plan_sequences`) that plans every sequence as segment copies;
no Python step runs per request. :func:`prepare_unit` does everything but the planning and
copying (a reader keeps its result per unit and store state); :func:`plan_unit` plans.

For request r (user u, time T, pointer snapshot S, tenant L, actions A, window w)::

    head  = tier rows of u with snapshot_id <= S, action in A, event_ts >= T - w   (last L)
    tail  = row's stored tail (streaming) | raw rows of u with W_S <= arrival < T (batch)
            filtered the same way
    seq   = last L of merge(head, tail) by (event_ts, event_id), projected to the columns

Jagged output (``values`` plus ``lengths``), worked for two requests with L = 3::

    request 0: events a b c d   -> keeps b c d        lengths = [3, 1]
    request 1: events e         -> keeps e            values["item_id"] = [b c d e]
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable

from lmat_platform.exceptions import O2OConsistencyError, ThinTableError
from lmat_platform.kernels import (
    CopySources,
    block_sorted_tails,
    copy_segments,
    is_sorted3,
    plan_sequences,
    ranges_sorted,
    request_heads,
    spans_sorted,
    user_ranges,
)
from lmat_platform.protocol.pointers import HeadIndex, expand_positions
from lmat_platform.protocol.thin import (
    TAIL_ARRIVAL_DELAY,
    TAIL_BLOCK,
    TAIL_PREFIX,
    TAIL_START,
    open_thin,
    read_raw_range,
    tails_from_raw,
)
from lmat_platform.schema import EVENT_COLUMNS
from lmat_platform.store import uih
from lmat_platform.store.cache import cache
from lmat_platform.store.core import Store, as_store, delta_dataset
from lmat_platform.store.deletion import forgotten_of, pending_of
from lmat_platform.store.snapshots import snapshot_arrays, snapshots_of
from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)

THIN_KEYS = ("request_id", "user_id", "request_ts", "bucket", "snapshot_id", "head_len",
             "head_checksum", "tail_len", TAIL_BLOCK, TAIL_START)
INT64_MAX = np.iinfo(np.int64).max


def tensor_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric, boolean or temporal Arrow array as numpy, as a tensor takes it: nulls become 0
    (NaN for floats), timestamps and durations int64."""
    arr = one_array(arr)
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_date64(t):
        arr = arr.view(pa.int64())
    if arr.null_count and not pa.types.is_floating(arr.type):
        arr = pc.fill_null(arr, pa.scalar(0, arr.type) if not pa.types.is_boolean(arr.type) else False)
    return arr.to_numpy(zero_copy_only=False)


@dataclass
class SegmentPlan:
    """Sequences planned but not yet copied: every request's events as segments over two
    sources per column, the bucket's head rows then its sorted tail events (virtual positions;
    see :mod:`lmat_platform.kernels`). Request ``r``'s segments are
    ``s0/s1[seg_off[r]:seg_off[r + 1]]``. A reader copies any subset of requests straight into
    its batch buffers, so each output value is written once."""

    seg_off: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    head: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]
    #: The ``event_id`` of every tail position (the same event may sit at several: tails
    #: copied per request), for :mod:`lmat_platform.reader.dedup`; None where not known.
    tail_id: np.ndarray | None = None
    _sources: tuple[tuple[str, ...], CopySources] | None = field(default=None, repr=False,
                                                                 compare=False)

    def segments(self, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(s0, s1) of a contiguous row slice (views) or of the given rows, in that order."""
        if isinstance(rows, slice):
            a, b = self.seg_off[rows.start], self.seg_off[rows.stop]
            return self.s0[a:b], self.s1[a:b]
        pos = expand_positions(self.seg_off[rows], self.seg_off[rows + 1])
        return self.s0[pos], self.s1[pos]

    def copy_all(self, columns: tuple[str, ...] | list[str], s0: np.ndarray, s1: np.ndarray,
                 outs: list[np.ndarray], offset: int) -> int:
        """Segments ``s0/s1`` of every column at once, into ``outs[i][offset:]`` (the sources
        are checked once per plan and columns)."""
        key = tuple(columns)
        if self._sources is None or self._sources[0] != key:
            self._sources = (key, CopySources([self.head[c] for c in columns],
                                              [self.tail[c] for c in columns]))
        return self._sources[1].copy(s0, s1, outs, offset)

    @classmethod
    def concat(cls, plans: list[SegmentPlan]) -> SegmentPlan:
        """One plan for the requests of several, in order (sources concatenated)."""
        if len(plans) == 1:
            return plans[0]
        cols = list(plans[0].head)
        nh = np.array([len(p.head[cols[0]]) for p in plans])
        nt = np.array([len(p.tail[cols[0]]) for p in plans])
        H = int(nh.sum())
        h_off = np.cumsum(nh) - nh
        t_off = np.cumsum(nt) - nt
        s0s, s1s, offs = [], [], []
        base = 0
        for p, n_h, ho, to in zip(plans, nh, h_off, t_off, strict=True):
            in_head = p.s0 < n_h
            shift = np.where(in_head, ho, H + to - n_h)
            empty = p.s1 <= p.s0
            s0s.append(np.where(empty, 0, p.s0 + shift))
            s1s.append(np.where(empty, 0, p.s1 + shift))
            offs.append(p.seg_off[:-1] + base)
            base += len(p.s0)
        return cls(
            np.concatenate([*offs, [base]]).astype(np.int64),
            np.concatenate(s0s), np.concatenate(s1s),
            {c: np.concatenate([p.head[c] for p in plans]) for c in cols},
            {c: np.concatenate([p.tail[c] for p in plans]) for c in cols},
            None if any(p.tail_id is None for p in plans)
            else np.concatenate([p.tail_id for p in plans]),
        )


@dataclass
class Sequences:
    """Reconstructed sequences of a set of requests, jagged (values + lengths per column)."""

    request_id: np.ndarray
    user_id: np.ndarray
    request_ts: np.ndarray
    lengths: np.ndarray
    values: dict[str, pa.Array]
    context: pa.Table
    bytes_read: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    #: With ``plan_only``: the tenant's columns as a copy plan instead of ``values``.
    plan: SegmentPlan | None = None

    def __len__(self) -> int:
        return len(self.request_id)

    def to_table(self) -> pa.Table:
        """One row per request: ids, ``length`` (int32) and one list column per tenant column."""
        offsets = pa.array(np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32))
        cols: dict[str, pa.Array] = {
            "request_id": pa.array(self.request_id, pa.int64()),
            "user_id": pa.array(self.user_id, pa.int64()),
            "request_ts": pa.array(self.request_ts, pa.int64()),
            "length": pa.array(self.lengths.astype(np.int32)),
        }
        for c, v in self.values.items():
            cols[c] = pa.ListArray.from_arrays(offsets, v)
        return pa.table(cols)


def concat_sequences(parts: list[Sequences], columns: tuple[str, ...]) -> Sequences:
    if not parts:
        return Sequences(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
            np.zeros(0, np.int64), {c: pa.array([], pa.int64()) for c in columns}, pa.table({}),
        )
    if len(parts) == 1:
        return parts[0]
    return Sequences(
        np.concatenate([p.request_id for p in parts]),
        np.concatenate([p.user_id for p in parts]),
        np.concatenate([p.request_ts for p in parts]),
        np.concatenate([p.lengths for p in parts]),
        {c: pa.concat_arrays([p.values[c] for p in parts]) for c in columns},
        pa.concat_tables([p.context for p in parts], promote_options="permissive"),
        sum(p.bytes_read for p in parts),
        {k: sum(p.stats.get(k, 0) for p in parts) for k in parts[0].stats},
    )


@dataclass
class ThinRows:
    """Thin rows as the kernel reads them: the scalar columns (keys, pointer, ride-along request
    columns) as a table, and each stored tail field flattened into one array of the store
    schema's type, row ``i``'s tail events at ``[t_start[i], t_end[i])``, in
    ``(event_ts, event_id)`` order when :attr:`tails_sorted`. A row with a null ``tail_len``
    (built by a batch job: its tail comes from the raw log) owns no stored events.

    Spans may overlap and come in any order: rows of the per-user tail format (one copy of a
    user's tail events per file, see :mod:`lmat_platform.protocol.thin`) are slices of their
    user's events, so a user's requests share them. Slicing rows and merging files never copy
    tail events, so a reader decodes a bucket's thin rows once into this form and cuts its work
    units from it::

        rows    r0      r1    r2          t_start = [0, 2, 2]   t_end = [2, 2, 5]
        tails   e0 e1 | -- | e2 e3 e4     rows[1:3] -> t_start [0, 0], t_end [0, 3], tails e2 e3 e4
        per-user format: r3 r4 of one user, events f0 f1 f2 stored once
                         t_start = [5, 5], t_end = [7, 8]   (r4 sees one more event)
    """

    table: pa.Table
    t_start: np.ndarray
    t_end: np.ndarray
    tails: dict[str, pa.Array]
    #: Every row's stored tail is in (event_ts, event_id) order (checked, not assumed).
    tails_sorted: bool

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def tail_events(self) -> int:
        """Tail events of all rows (a user's shared events counted once per request)."""
        return int((self.t_end - self.t_start).sum())

    def streamed(self) -> np.ndarray:
        """Rows whose tail is stored (a non-null ``tail_len``)."""
        if "tail_len" not in self.table.column_names:
            return np.zeros(self.num_rows, dtype=bool)
        if self.table.column("tail_len").null_count == 0:
            return np.ones(self.num_rows, dtype=bool)
        return np.asarray(column_array(self.table, "tail_len").is_valid()
                          .to_numpy(zero_copy_only=False), dtype=bool)

    def take(self, idx: np.ndarray) -> ThinRows:
        """Rows ``idx`` in that order (tail events shared, not copied)."""
        return ThinRows(self.table.take(pa.array(idx)), self.t_start[idx], self.t_end[idx],
                        self.tails, self.tails_sorted)

    def without_users(self, users: np.ndarray) -> ThinRows:
        """These rows less those of ``users`` (itself when it has none): what a pass serves
        while their forget is pending (:attr:`ReadContext.hidden`)."""
        if not len(users) or not self.num_rows:
            return self
        keep = ~np.isin(column_array(self.table, "user_id").to_numpy(), users)
        if keep.all():
            return self
        # Their events stay in this process's decoded arrays, but no kept row points at them.
        return self.take(np.flatnonzero(keep))

    def slice(self, lo: int, hi: int) -> ThinRows:
        """Rows ``lo..hi`` (zero-copy): tails cut to the events those rows point at."""
        s, e = self.t_start[lo:hi], self.t_end[lo:hi]
        used = e > s
        a = int(s[used].min()) if used.any() else 0
        b = int(e[used].max()) if used.any() else 0
        return ThinRows(self.table.slice(lo, hi - lo), np.where(used, s - a, 0),
                        np.where(used, e - a, 0),
                        {c: v.slice(a, b - a) for c, v in self.tails.items()}, self.tails_sorted)

    @classmethod
    def concat(cls, parts: list[ThinRows]) -> ThinRows:
        """The rows of several (e.g. a bucket's files), in order; tails concatenated."""
        if len(parts) == 1:
            return parts[0]
        base = np.cumsum([0] + [len(next(iter(p.tails.values()), [])) for p in parts])
        table = pa.concat_tables([p.table for p in parts], promote_options="permissive")
        tails = {c: pa.concat_arrays([one_array(p.tails[c]) for p in parts])
                 for c in parts[0].tails}
        return cls(table, np.concatenate([p.t_start + o for p, o in zip(parts, base, strict=False)]),
                   np.concatenate([p.t_end + o for p, o in zip(parts, base, strict=False)]),
                   tails, all(p.tails_sorted for p in parts))

    @classmethod
    def from_table(cls, rows: pa.Table, columns: list[str], schema: pa.Schema, *,
                   limit: int | None = None) -> ThinRows:
        """Flatten the stored tails of ``columns`` (event columns, typed as in ``schema``; a
        field the thin rows lack is all nulls) out of thin ``rows``, and check each row's tail
        holds ``tail_len`` events.

        Rows of either format: a row's own lists hold its tail (``tail_block`` null or absent),
        or it points into its user's events, stored once in the lists of the row whose
        ``request_id`` is its ``tail_block``, at ``tail_start`` (that row must be among
        ``rows``). Shared events are stored in arrival order; each such request's tail is
        served in ``(event_ts, event_id)`` order, as a zero-copy span where its events already
        are in that order, else as a sorted copy (each user's events sorted once).

        ``limit``: such a sorted copy keeps only the request's last ``limit`` events in that
        order (for a tenant of ``max_len`` ``limit`` without an action filter, which never
        reaches further back); None keeps every event."""
        rid = rows.column("request_id").to_numpy()
        names = rows.column_names
        R = len(rid)
        lens = (pc.fill_null(column_array(rows, "tail_len"), 0).to_numpy().astype(np.int64)
                if "tail_len" in names else np.zeros(R, dtype=np.int64))
        blk = (column_array(rows, TAIL_BLOCK) if TAIL_BLOCK in names
               else pa.nulls(R, pa.int64()))
        shared = np.asarray(blk.is_valid().to_numpy(zero_copy_only=False), dtype=bool) \
            if blk.null_count < R else np.zeros(R, dtype=bool)
        # Events each row's lists hold: its tail (own format), its user's events (the row a
        # shared block lives in), or none.
        stored = lens.copy()
        if shared.any():
            ref = TAIL_PREFIX + "event_ts"
            if ref not in names:
                raise ThinTableError(f"thin rows point into shared tails but have no {ref}")
            got = pc.fill_null(pc.list_value_length(rows.column(ref)), 0).to_numpy()
            stored[shared] = got[shared]
        off = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(stored, out=off[1:])
        n_ev = int(off[-1])
        tails: dict[str, pa.Array] = {}
        for c in columns:
            typ = schema.field(c).type
            if c == "arrival_ts" and TAIL_ARRIVAL_DELAY in names:
                v = tail_arrival(rows, stored, rid, tails.get("event_ts"))
            elif TAIL_PREFIX + c not in names:
                tails[c] = pa.nulls(n_ev, typ)
                continue
            else:
                v = one_array(_tail_values(rows.column(TAIL_PREFIX + c), stored, rid))
            tails[c] = v if v.type == typ else v.cast(typ)
        t_start, t_end = off[:-1].copy(), off[:-1] + lens
        ordered = True
        if shared.any():
            t_start, t_end, tails = _shared_spans(rows, rid, lens, shared, stored, off, tails,
                                                  t_start, t_end, limit)
            own = ~shared
            if "event_ts" in tails and "event_id" in tails and own.any() and n_ev:
                ordered = bool(spans_sorted(t_start[own], t_end[own],
                                            tensor_numpy(tails["event_ts"]),
                                            tensor_numpy(tails["event_id"])).all())
        elif "event_ts" in tails and "event_id" in tails and n_ev:
            ordered = ranges_sorted(off, tensor_numpy(tails["event_ts"]),
                                    tensor_numpy(tails["event_id"]))
        fields = [c for c in names if c.startswith(TAIL_PREFIX) and c not in THIN_KEYS]
        return cls(rows.drop_columns(fields), t_start, t_end, tails, ordered)


def tail_arrival(rows: pa.Table, stored: np.ndarray, rid: np.ndarray,
                 event_ts: pa.Array | None = None) -> pa.Array:
    """The stored tail events' ``arrival_ts`` (flattened as :meth:`ThinRows.from_table`
    flattens its tails; ``event_ts``: theirs, when flattened already): a row's
    ``tail_arrival_ts`` values (thin formats 1 and 2), or, where that list is null, its
    ``tail_event_ts`` plus its :data:`TAIL_ARRIVAL_DELAY` (format 3), in int64."""
    delay = one_array(_tail_values(rows.column(TAIL_ARRIVAL_DELAY), stored, rid))
    ev = (event_ts if event_ts is not None
          else one_array(_tail_values(rows.column(TAIL_PREFIX + "event_ts"), stored, rid)))
    col = (rows.column(TAIL_PREFIX + "arrival_ts") if TAIL_PREFIX + "arrival_ts" in
           rows.column_names else None)
    if col is None or col.null_count == len(col):
        a, b = _fixed_numpy(ev), _fixed_numpy(delay)
        if a is not None and b is not None:
            # Every stored event in format 3: one addition (int64, wrapping as the writer's
            # subtraction does, so exact for any times).
            return pa.array(a.astype(np.int64, copy=False) + b)
        return pc.add(ev.cast(pa.int64()), delay)
    # Formats mixed in one bucket: each row's own values where it has them.
    got = one_array(_tail_values(col, stored, rid)).cast(pa.int64())
    return pc.coalesce(got, pc.add(ev.cast(pa.int64()), delay))


def _shared_spans(
    rows: pa.Table, rid: np.ndarray, lens: np.ndarray, shared: np.ndarray, stored: np.ndarray,
    off: np.ndarray, tails: dict[str, pa.Array], t_start: np.ndarray, t_end: np.ndarray,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, pa.Array]]:
    """Spans of rows that point into a shared block (see :meth:`ThinRows.from_table`)."""
    blk = column_array(rows, TAIL_BLOCK).to_numpy(zero_copy_only=False)
    start = (pc.fill_null(column_array(rows, TAIL_START), -1).to_numpy().astype(np.int64)
             if TAIL_START in rows.column_names else np.full(len(rid), -1, dtype=np.int64))
    j = np.flatnonzero(shared)
    order = np.argsort(rid, kind="stable")
    pos = np.searchsorted(rid[order], blk[j])
    pos_c = np.minimum(pos, len(rid) - 1)
    found = rid[order][pos_c] == blk[j]
    owner = order[pos_c]
    ok = found & shared[owner] & (blk[owner] == rid[owner]) & (start[j] >= 0)
    ok &= start[j] + lens[j] <= np.where(found, stored[owner], -1)
    if not ok.all():
        k = np.flatnonzero(~ok)[0]
        i = j[k]
        why = "hold fewer" if found[k] else "is not among its rows"
        raise ThinTableError(
            f"request {rid[i]}: its tail points at {lens[i]} events from {start[i]} of the "
            f"events stored with request {blk[i]}, which {why}"
        )
    t_start = t_start.copy()
    t_end = t_end.copy()
    t_start[j] = off[owner] + start[j]
    t_end[j] = t_start[j] + lens[j]
    if not ("event_ts" in tails and "event_id" in tails) or not len(j):
        return t_start, t_end, tails
    ts = tensor_numpy(tails["event_ts"])
    ids = tensor_numpy(tails["event_id"])
    ok_sorted = spans_sorted(t_start[j], t_end[j], ts, ids)
    if ok_sorted.all():
        return t_start, t_end, tails
    # Late events (arrived after events that sort after them): those requests' tails become
    # sorted copies, appended after the stored events; every block is sorted once.
    bad = j[~ok_sorted]
    b_own = owner[~ok_sorted]
    grp = np.argsort(b_own, kind="stable")
    bad, b_own = bad[grp], b_own[grp]
    blocks, r_blk = np.unique(b_own, return_inverse=True)
    idx, first = block_sorted_tails(ts, ids, off[blocks], off[blocks] + stored[blocks],
                                    r_blk, t_start[bad], t_end[bad], limit)
    n = len(ts)
    t_start[bad] = n + first
    t_end[bad] = n + first + (lens[bad] if limit is None else np.minimum(lens[bad], limit))
    tails = {c: _append_taken(v, idx) for c, v in tails.items()}
    return t_start, t_end, tails


def _append_taken(v: pa.Array, idx: np.ndarray) -> pa.Array:
    """``v`` followed by ``v[idx]``: one numpy gather into one new buffer for a null-free
    fixed-width array (Arrow's take then concat copies twice), Arrow's take otherwise."""
    a = _fixed_numpy(v) if pa.types.is_integer(v.type) or pa.types.is_floating(v.type) else None
    if a is None:
        return pa.concat_arrays([v, v.take(pa.array(idx))])
    out = np.empty(len(a) + len(idx), dtype=a.dtype)
    out[:len(a)] = a
    np.take(a, idx, out=out[len(a):])
    return pa.array(out)


def own_tails(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """Thin ``rows`` in thin format 1: each streamed row's own tail, in (event_ts, event_id)
    order, in its own ``tail_<field>`` lists (typed as in ``schema``, the store's event
    schema); ``tail_block``, ``tail_start`` and ``tail_arrival_delay`` (format 3: its
    arrival times are in ``tail_arrival_ts``), where present, all null (same schema). Readers
    take either format (also mixed in one table); this is for tools that edit or inspect
    single rows' tails."""
    fields = [c.removeprefix(TAIL_PREFIX) for c in rows.column_names
              if c.startswith(TAIL_PREFIX) and c not in (*THIN_KEYS, TAIL_ARRIVAL_DELAY)]
    thin = ThinRows.from_table(rows, fields, schema)
    pos = pa.array(expand_positions(thin.t_start, thin.t_end))
    off = np.zeros(rows.num_rows + 1, dtype=np.int32)
    np.cumsum(thin.t_end - thin.t_start, out=off[1:])
    mask = (pc.is_null(column_array(rows, "tail_len")) if "tail_len" in rows.column_names
            else pa.array(np.ones(rows.num_rows, dtype=bool)))
    cols = {c: (pa.nulls(rows.num_rows, rows.schema.field(c).type)
                if c in (TAIL_BLOCK, TAIL_START) else rows.column(c))
            for c in rows.column_names if not (c.startswith(TAIL_PREFIX) and c not in THIN_KEYS)}
    for f in fields:
        cols[TAIL_PREFIX + f] = pa.ListArray.from_arrays(pa.array(off), thin.tails[f].take(pos),
                                                         mask=mask)
    if TAIL_ARRIVAL_DELAY in rows.column_names:  # arrival times are whole in format 1
        cols[TAIL_ARRIVAL_DELAY] = pa.nulls(rows.num_rows,
                                            rows.schema.field(TAIL_ARRIVAL_DELAY).type)
    return pa.table(cols).select(rows.column_names)


@dataclass
class ReadContext:
    """Everything a pass needs besides the rows: picklable, cheap to build once per pass."""

    store: Store
    tenant: Tenant
    published_at: np.ndarray
    watermarks: np.ndarray
    forgotten: np.ndarray
    files: dict[int, list[uih.TierFile]]
    schema: pa.Schema
    #: Data files of ``heads/`` per bucket, listed once per pass (pinned like the tier's files).
    heads_files: dict[int, list[str]]
    verify: bool = True

    #: The store state the context was built from (each table's version, by key): what a
    #: reader's cached :class:`PreparedUnit` depends on besides its rows. None: do not cache.
    state: tuple[Any, ...] | None = None
    #: Users whose forget is pending (tombstoned, not yet physically deleted), sorted: a pass
    #: serves none of their requests (spec 7: their examples are being deleted), see
    #: :meth:`ThinRows.without_users`.
    hidden: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, store: Store | str, tenant: Tenant, *, verify: bool = True) -> ReadContext:
        store = as_store(store)
        # Each piece is derived from its table's log once per version and process (one listing
        # of each log finds the latest versions): building a loader per pass or per epoch
        # costs a few listings, not a replay of every file list.
        snaps, k_snap = store.derived_keyed("snapshots", "reader-arrays", _snapshot_arrays)
        published_at, watermarks = snaps or (np.zeros(0, dtype=np.int64),
                                             np.zeros(0, dtype=np.int64))
        tier, k_uih = store.derived_keyed("uih", "reader-files", _tier_files)
        files, schema = tier or ({}, pa.schema([pa.field(c, t) for c, t in EVENT_COLUMNS.items()]))
        # A trait added by a file ingested after the newest snapshot is in the raw log (and so
        # in tails) but not yet in the tier: it is a stored column all the same.
        raw, k_raw = store.derived_keyed("raw", "schema",
                                         lambda dt: pa.schema(dt.schema().to_arrow()))
        if raw is not None:
            have = set(schema.names)
            schema = pa.schema([*schema, *(
                f for f in raw if f.name not in have and f.name not in ("source", "batch_id"))])
        tenant.check_columns(schema.names)
        _, root = store.filesystem()
        heads_files, k_heads = store.derived_keyed("heads", "reader-files",
                                                   functools.partial(_heads_files, root=root))
        # Every tombstone (their O2O mismatches are expected) and the pending ones (not served),
        # from one version of the registry.
        tombs, k_forgot = store.derived_keyed("forgotten", "reader-tombstones", _tombstones)
        forgotten, hidden = tombs if tombs is not None else (None, None)
        keys = (k_snap, k_uih, k_raw, k_heads, k_forgot)
        tables = (snaps, tier, raw, heads_files, forgotten)
        # A table that exists but whose version is not shared has no key: nothing is cached.
        state = (store.store_id, keys) if all(
            k is not None or v is None for k, v in zip(keys, tables, strict=True)) else None
        return cls(store, tenant, published_at, watermarks,
                   forgotten if forgotten is not None else np.zeros(0, dtype=np.int64), files,
                   schema, heads_files or {}, verify, state,
                   hidden if hidden is not None else np.zeros(0, dtype=np.int64))


def _tombstones(dt: DeltaTable) -> tuple[np.ndarray, np.ndarray]:
    return forgotten_of(dt), pending_of(dt)


def _snapshot_arrays(dt: DeltaTable) -> tuple[np.ndarray, np.ndarray]:
    return snapshot_arrays(snapshots_of(delta_dataset(dt).to_table()))


def _tier_files(dt: DeltaTable) -> tuple[dict[int, list[uih.TierFile]], pa.Schema]:
    files: dict[int, list[uih.TierFile]] = {}
    for f in uih.list_files(dt):
        files.setdefault(f.bucket, []).append(f)
    for fl in files.values():
        fl.sort(key=lambda f: f.path)  # a stable order
    return files, pa.schema(dt.schema().to_arrow())


def _heads_files(dt: DeltaTable, *, root: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    at = pa.table(dt.get_add_actions(flatten=True))
    if at.num_rows:
        for p, b in zip(at.column("path").to_pylist(),
                        at.column("partition.bucket").to_pylist(), strict=True):
            out.setdefault(int(b), []).append(f"{root}/heads/{p}")
    return out


def column_array(table: pa.Table, name: str) -> pa.Array:
    """A table column as one Arrow array (chunks combined)."""
    return one_array(table.column(name))


def one_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An array, or a chunked array's chunks as one array: zero-copy when there is one chunk
    (Arrow's ``combine_chunks`` copies even then)."""
    if not isinstance(col, pa.ChunkedArray):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def reconstruct_bucket(
    ctx: ReadContext, bucket: int, rows: pa.Table | ThinRows, *, plan_only: bool = False
) -> Sequences:
    """Rebuild the tenant's sequences for thin ``rows`` that all lie in ``bucket`` (a thin
    table's rows, or :class:`ThinRows` already flattened: a reader's decoded units).

    With ``plan_only`` the sequences come back as a :class:`SegmentPlan` over numpy sources
    (nulls as :func:`tensor_numpy` makes them) and ``values`` is empty: the loader copies them
    into its batches."""
    return plan_unit(prepare_unit(ctx, bucket, rows), plan_only=plan_only)


@dataclass
class PreparedUnit:
    """The planner's inputs for a set of thin rows of one bucket, checked (pointers name
    published snapshots, O2O consistency) and resolved (head entries, cutoffs, the bucket's
    head rows, each request's rows and tail): what :func:`plan_unit` plans and copies from.

    Built from immutable files and the store state named by :attr:`ReadContext.state`, so a
    reader keeps it in the decoded cache (:func:`prepare_unit` with a ``key``): a later pass
    over the same rows plans and copies every sequence again, without redoing the checks,
    lookups and the read."""

    L: int
    rid: np.ndarray
    users: np.ndarray
    T: np.ndarray
    S: np.ndarray
    has_head: np.ndarray
    cut_r: np.ndarray
    t_min: np.ndarray
    E: pa.Table
    eu: np.ndarray
    ets: np.ndarray
    eid: np.ndarray
    esn: np.ndarray
    u_start: np.ndarray
    e_end: np.ndarray
    tails: dict[str, pa.Array | pa.ChunkedArray]
    tts: np.ndarray
    tid: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    #: The tenant's columns as numpy, in the store schema's type: head rows and tail events.
    head_src: dict[str, np.ndarray]
    tail_src: dict[str, np.ndarray]
    context: pa.Table
    bytes_read: int
    stats: dict[str, int]

    @property
    def nbytes(self) -> int:
        """Bytes of every array it holds (views of cached data included: it keeps them alive)."""
        arrays = [self.rid, self.users, self.T, self.S, self.has_head, self.cut_r, self.t_min,
                  self.eu, self.ets, self.eid, self.esn, self.u_start, self.e_end, self.tts,
                  self.tid, self.t_start, self.t_end, *self.head_src.values(),
                  *self.tail_src.values()]
        return (sum(a.nbytes for a in arrays) + self.E.nbytes + self.context.nbytes
                + sum(v.nbytes for v in self.tails.values()))


def prepare_unit(
    ctx: ReadContext, bucket: int,
    rows: pa.Table | ThinRows | Callable[[], ThinRows], *, key: tuple[Any, ...] | None = None,
) -> PreparedUnit:
    """Check and resolve thin ``rows`` of ``bucket`` for the planner (see :class:`PreparedUnit`).

    ``rows`` may be a callable that returns them, called only when needed: with ``key`` (what
    names the rows: their files, slice and columns) the result is kept in the decoded cache
    under the key followed by the bucket, the tenant and :attr:`ReadContext.state` (so whoever
    drops entries by the key's prefix drops these too), and served from there while the
    store's state and the rows' files are the same."""
    full_key = None
    if key is not None and ctx.state is not None:
        t = ctx.tenant
        full_key = (*key, "unit", ctx.state, bucket, t.columns, t.max_len, t.actions,
                    t.window_us, ctx.verify, t.summary is None)
        hit = cache().get(full_key)
        if hit is not None:
            return hit
    if callable(rows):
        rows = rows()
    prep = _prepare(ctx, bucket, rows)
    if full_key is not None:
        cache().put(full_key, prep, prep.nbytes, evict=False)
    return prep


def plan_unit(prep: PreparedUnit, *, plan_only: bool = False) -> Sequences:
    """Plan every request's sequence of a prepared unit (one compiled call) and, unless
    ``plan_only``, copy them out (see :func:`reconstruct_bucket`)."""
    # Each request's head range (less late rows of later snapshots) merged with its tail by
    # (event_ts, event_id) and cut to the last L, as segment copies.
    lengths, seg_off, s0, s1 = plan_sequences(
        prep.eu, prep.ets, prep.eid, prep.esn, prep.u_start, prep.e_end, prep.cut_r, prep.S,
        prep.has_head, prep.t_start, prep.t_end, prep.t_min, prep.tts, prep.tid, prep.L)
    values: dict[str, pa.Array] = {}
    plan = None
    if plan_only:
        plan = SegmentPlan(seg_off, s0, s1, prep.head_src, prep.tail_src, prep.tid)
    else:
        for c in prep.head_src:
            values[c] = _gather_segments(prep.E.column(c), prep.tails[c], s0, s1)
    return Sequences(prep.rid, prep.users, prep.T, lengths, values, prep.context,
                     prep.bytes_read, dict(prep.stats), plan)


def _prepare(ctx: ReadContext, bucket: int, rows: pa.Table | ThinRows) -> PreparedUnit:
    t = ctx.tenant
    L = t.max_len
    need = event_columns(t)
    thin = rows if isinstance(rows, ThinRows) else ThinRows.from_table(rows, need, ctx.schema)
    rows = thin.table
    rid = rows.column("request_id").to_numpy()
    users = rows.column("user_id").to_numpy()
    T = rows.column("request_ts").to_numpy()
    S = rows.column("snapshot_id").to_numpy().astype(np.int64)
    R = len(rid)
    n_snap = len(ctx.watermarks)

    heads = HeadIndex.of_files(ctx.store, ctx.heads_files.get(bucket, []))
    w = t.window_us
    lo_ts = T - w if w is not None else None
    hl = rows.column("head_len").to_numpy()
    cs = rows.column("head_checksum").to_numpy()
    # Checks, each request's head entry and its head cutoff (its window, and the earliest time
    # its last L can reach at its snapshot: rows before it cannot be among them), in one
    # compiled pass.
    code, i, at, cut_r = request_heads(
        users, S, T, ctx.published_at, n_snap, heads.user_id, heads.snapshot_id,
        heads.head_len, heads.head_checksum,
        heads.marker_column(L) if t.actions is None else None,
        ctx.forgotten, ctx.verify, hl, cs, w)
    if code == 1:
        raise ThinTableError(
            f"request {rid[i]}: pointer names snapshot {S[i]}, which does not exist in "
            f"{ctx.store.root} ({n_snap} snapshots)"
        )
    if code == 2:
        raise ThinTableError(
            f"request {rid[i]}: pointer names snapshot {S[i]}, published after the request time {T[i]}"
        )
    if code == 3:
        exp_len, exp_cs = heads.pointers(users[i:i + 1], S[i:i + 1], at[i:i + 1])
        raise O2OConsistencyError(
            f"request {rid[i]}: O2O consistency error: user {users[i]}'s head at snapshot "
            f"{S[i]} has length {exp_len[0]} and checksum {int(exp_cs[0]) & 0xFFFFFFFFFFFFFFFF:#x}, "
            f"but the pointer says {hl[i]} and {int(cs[i]) & 0xFFFFFFFFFFFFFFFF:#x}"
        )

    # --- head: one pruned read of the bucket serves every request in it, each user from the
    # lowest cutoff of its requests that have a head
    has_head = S >= 0
    h_users, h_cut = users[has_head], cut_r[has_head]
    if len(h_users) and not (h_users[1:] >= h_users[:-1]).all():
        o = np.argsort(h_users, kind="stable")
        h_users, h_cut = h_users[o], h_cut[o]
    starts = np.flatnonzero(np.r_[True, h_users[1:] != h_users[:-1]]) if len(h_users) else \
        np.zeros(0, dtype=np.int64)
    # Summary tenants (spec section 10): the sequence is the summary's tail, which the summary
    # server reads (the tier after the summary's snapshot, then the raw log), once; here the
    # pointers are only checked and no events are read.
    events = t.summary is None
    files = ctx.files.get(bucket, []) if len(h_users) and events else []
    if t.actions is None and len(h_users):
        # Stripes of a compaction no request's last L can reach (uih.stripe_skippable).
        s_min = int(S[has_head].min())
        files = [f for f in files if not uih.stripe_skippable(f, L, s_min)]
    br = uih.read_bucket(
        ctx.store,
        files,
        users=h_users[starts],
        cutoffs=np.minimum.reduceat(h_cut, starts) if len(starts) else h_cut[:0],
        columns=t.columns,
        actions=t.action_array,
        max_snapshot=int(S.max(initial=-1)),
        min_ts=int(lo_ts.min()) if lo_ts is not None and R else None,
        schema=ctx.schema,
        exact=False,  # the planner finds each request's rows; no filtered copy of the rows
    )
    E = br.table
    eu = E.column("user_id").to_numpy()
    ets = E.column("event_ts").to_numpy()
    esn = E.column("snapshot_id").to_numpy()
    u_start, e_end = user_ranges(eu, users)

    # --- tails: stored (streaming) or from the raw log (batch). Stored tails already in order
    # serve as they are (zero-copy): the window is a prefix cut the planner makes per request.
    streamed = thin.streamed()
    tail_events = thin.tail_events
    batch = np.flatnonzero(~streamed)
    if not events:
        tails: dict[str, pa.Array | pa.ChunkedArray] = {
            c: pa.array([], ctx.schema.field(c).type) for c in need}
        t_start = t_end = np.zeros(R, dtype=np.int64)
        tail_events = 0
    elif not len(batch) and t.actions is None and thin.tails_sorted:
        tails = {c: thin.tails[c] for c in need}
        t_start, t_end = thin.t_start, thin.t_end
    else:
        spans = pa.array(expand_positions(thin.t_start, thin.t_end))
        tail_parts = [pa.table({c: one_array(thin.tails[c]).take(spans) for c in need})]
        t_owners = [np.repeat(np.arange(R), thin.t_end - thin.t_start)]
        if len(batch):
            wm = np.where(S >= 0, ctx.watermarks[np.maximum(S, 0)] if n_snap else 0,
                          np.iinfo(np.int64).min)
            lo_a = int(wm[batch].min())
            raw = read_raw_range(
                ctx.store, users[batch], None if lo_a == np.iinfo(np.int64).min else lo_a,
                int(T[batch].max()), buckets=np.array([bucket]),
                columns=list(dict.fromkeys(["user_id", "arrival_ts", *need])),
            )
            own_b, pos_b = tails_from_raw(raw, users[batch], wm[batch], T[batch])
            tail_parts.append(raw.select(need).take(pa.array(pos_b)))
            t_owners.append(batch[own_b])
            tail_events += len(own_b)
        tail_schema = pa.schema([ctx.schema.field(c) for c in need])
        tt = pa.concat_tables([p.cast(tail_schema) for p in tail_parts])
        t_own = np.concatenate(t_owners)
        # Filtered by action and in (request, event_ts, event_id) order: taken in that order
        # unless they already are.
        tts = tensor_numpy(tt.column("event_ts"))
        tid = tensor_numpy(tt.column("event_id"))
        k = np.ones(len(t_own), dtype=bool)
        if t.actions is not None:
            k &= np.isin(tt.column("action").to_numpy(), t.action_array)  # type: ignore[arg-type]
        if not (k.all() and is_sorted3(t_own, tts, tid)):
            o = np.flatnonzero(k)[np.lexsort((tid[k], tts[k], t_own[k]))]
            tt = tt.take(pa.array(o))
            t_own = t_own[o]
        tails = {c: tt.column(c) for c in need}
        n_t = np.bincount(t_own, minlength=R)
        t_end = np.cumsum(n_t)
        t_start = t_end - n_t
    tts = tensor_numpy(tails["event_ts"])
    tid = tensor_numpy(tails["event_id"])

    eid = E.column("event_id").to_numpy()
    t_min = lo_ts if lo_ts is not None else np.full(R, np.iinfo(np.int64).min, dtype=np.int64)

    def source(col: pa.Array | pa.ChunkedArray, c: str) -> np.ndarray:
        # Both sources in the store schema's type (tails already are): every plan of a
        # column, whatever bucket or file it came from, has one dtype, so batches that mix
        # plans copy without widening.
        typ = ctx.schema.field(c).type
        return tensor_numpy(col if col.type == typ else col.cast(typ))

    ctx_cols = [c for c in rows.column_names if is_context_column(c)]
    # Head rows count from each request's cutoff on (its window, and the earliest time its
    # last L can reach at its snapshot: rows before it cannot be among them).
    return PreparedUnit(
        L, rid, users, T, S, has_head, cut_r, t_min, E, eu, ets, eid, esn, u_start, e_end,
        tails, tts, tid, t_start, t_end,
        {c: source(E.column(c), c) for c in t.columns},
        {c: source(tails[c], c) for c in t.columns},
        rows.select(ctx_cols), br.bytes_read,
        {
            "row_groups_read": br.row_groups_read,
            "row_groups_skipped": br.row_groups_skipped,
            "head_rows_decoded": E.num_rows,
            "tail_events": tail_events,
        },
    )


def event_columns(tenant: Tenant) -> list[str]:
    """Event columns the kernel needs for a tenant: ordering keys, its columns, its filter."""
    return list(dict.fromkeys(["event_ts", "event_id", *tenant.columns,
                               *(["action"] if tenant.actions is not None else [])]))


def thin_columns(tenant: Tenant, names: list[str]) -> list[str]:
    """Thin-table columns to read for a tenant: keys, pointer, and only its tail fields
    (column pushdown into the thin rows); ride-along request columns are added by callers."""
    events = event_columns(tenant)
    want = [*THIN_KEYS, *(TAIL_PREFIX + c for c in events),
            *([TAIL_ARRIVAL_DELAY] if "arrival_ts" in events else [])]
    return [c for c in want if c in names]


def is_context_column(name: str) -> bool:
    """A ride-along request column (not a key, pointer or tail field)."""
    return name not in THIN_KEYS and not name.startswith(TAIL_PREFIX)


def _tail_values(col: pa.ChunkedArray, lens: np.ndarray, rid: np.ndarray) -> pa.ChunkedArray:
    """Flattened values of one tail column; each row's list must hold ``tail_len`` values.

    A row logged before a trait column existed has a null list in that column (the thin table's
    schema grew later): its tail events get nulls there, as they have in the raw log.
    """
    got = pc.fill_null(pc.list_value_length(col), -1).to_numpy()
    missing = got < 0
    bad = np.flatnonzero(~missing & (got != lens))
    if len(bad):
        i = bad[0]
        raise ThinTableError(
            f"request {rid[i]}: tail column holds {got[i]} events but tail_len says {lens[i]}"
        )
    flat = pc.list_flatten(col)
    if not (missing & (lens > 0)).any():
        return flat
    idx = np.full(int(lens.sum()), -1, dtype=np.int64)
    present = np.repeat(~missing, lens)
    idx[present] = np.arange(int(present.sum()))
    return flat.take(pa.array(idx, mask=idx < 0))


def _fixed_numpy(arr: pa.Array) -> np.ndarray | None:
    """A null-free fixed-width array as numpy (temporal types as int64), or None."""
    t = arr.type
    fixed = (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
             or pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_date64(t))
    return tensor_numpy(arr) if fixed and not arr.null_count else None


def _gather_segments(
    head: pa.ChunkedArray | pa.Array, tail: pa.ChunkedArray | pa.Array | None,
    s0: np.ndarray, s1: np.ndarray,
) -> pa.Array:
    """The values of segments ``[s0, s1)`` over the head column's rows, then the tail's.

    Fixed-width columns without nulls go through the compiled slice copy (the Arrow array wraps
    its output); other columns through Arrow take."""
    h = one_array(head)
    tl = None
    if tail is not None and len(tail):
        tl = one_array(tail)
        if tl.type != h.type:
            tl = tl.cast(h.type)
    hn = _fixed_numpy(h)
    tn = _fixed_numpy(tl) if tl is not None else None
    if hn is not None and (tl is None or tn is not None):
        out = copy_segments(hn, tn, s0, s1)
        if pa.types.is_boolean(h.type):
            return pa.array(out, type=h.type)
        return pa.Array.from_buffers(h.type, len(out), [None, pa.py_buffer(out)])
    vpos = expand_positions(s0, s1)
    src = h if tl is None else pa.concat_arrays([h, tl])
    return src.take(pa.array(vpos))


def thin_buckets(thin: pads.Dataset) -> list[int]:
    """Buckets present in a thin table (from partition values, no data read)."""
    import re

    out = set()
    for frag in thin.get_fragments():
        m = re.search(r"bucket=(\d+)", frag.path)
        if m:
            out.add(int(m.group(1)))
    return sorted(out)


def iter_reconstruct(
    store: Store | str, thin_uri: str, tenant: Tenant, *, verify: bool = True,
    buckets: list[int] | None = None,
) -> Iterator[Sequences]:
    """Reconstruct a whole thin table, one bucket at a time."""
    store = as_store(store)
    dt = open_thin(store, thin_uri)
    ctx = ReadContext.build(store, tenant, verify=verify)
    ds = delta_dataset(dt)
    cols = thin_columns(tenant, ds.schema.names) + [
        c for c in ds.schema.names if is_context_column(c)]
    # Bound the memory of one call (about 2^23 output values), cutting at user boundaries so
    # each chunk's users are contiguous in the tier's sort order.
    chunk = max(256, (1 << 23) // tenant.max_len)
    for b in buckets if buckets is not None else thin_buckets(ds):
        f = pads.field("bucket") == b
        if len(ctx.hidden):
            f &= ~pads.field("user_id").isin(pa.array(ctx.hidden))
        rows = ds.to_table(filter=f, columns=cols)
        if not rows.num_rows:
            continue
        rows = rows.sort_by([("user_id", "ascending"), ("request_ts", "ascending")])
        u = rows.column("user_id").to_numpy()
        start = 0
        while start < len(u):
            end = min(start + chunk, len(u))
            if end < len(u):
                # Cut before the user at ``end``; a user bigger than a chunk goes whole.
                cut = int(np.searchsorted(u, u[end], side="left"))
                end = cut if cut > start else int(np.searchsorted(u, u[end], side="right"))
            yield reconstruct_bucket(ctx, b, rows.slice(start, end - start))
            start = end


def materialize(
    store: Store | str, thin_uri: str, tenant: Tenant, out: str, *, verify: bool = True
) -> dict[str, object]:
    """``lmat materialize``: write one row per request with the tenant's sequences."""
    parts = list(iter_reconstruct(store, thin_uri, tenant, verify=verify))
    seqs = concat_sequences(parts, tenant.columns)
    table = seqs.to_table().sort_by("request_id")
    tmp = f"{out}.tmp-{np.random.default_rng().integers(1 << 30)}"
    pq.write_table(table, tmp)
    import os

    os.replace(tmp, out)
    return {
        "tenant": tenant.name,
        "requests": table.num_rows,
        "events": int(seqs.lengths.sum()),
        "bytes_read": seqs.bytes_read,
        "out": out,
    }
