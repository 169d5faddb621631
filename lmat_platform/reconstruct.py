"""The reconstruction kernel: head via pointer + tail, merged, tenant projection (spec 4-6).

Works a bucket at a time and is vectorized over all requests of the bucket: one pruned read of
the bucket's UIH files serves every request in it, and every step below is a numpy operation over
whole arrays (the only Python loop is over the distinct snapshot ids the bucket's pointers name).

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

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lmat_platform.exceptions import O2OConsistencyError, ThinTableError
from lmat_platform.protocol.pointers import HeadIndex, expand_ranges, searchsorted2
from lmat_platform.protocol.thin import TAIL_PREFIX, open_thin, read_raw_range, tails_from_raw
from lmat_platform.schema import EVENT_COLUMNS
from lmat_platform.store import uih
from lmat_platform.store.core import Store, as_store, delta_dataset
from lmat_platform.store.deletion import forgotten_users
from lmat_platform.store.snapshots import NO_MARKER, list_snapshots, resolve_snapshot
from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)

THIN_KEYS = ("request_id", "user_id", "request_ts", "bucket", "snapshot_id", "head_len",
             "head_checksum", "tail_len")
INT64_MAX = np.iinfo(np.int64).max


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

    @classmethod
    def build(cls, store: Store | str, tenant: Tenant, *, verify: bool = True) -> ReadContext:
        store = as_store(store)
        snaps = list_snapshots(store)
        dt = store.open_table("uih")
        files: dict[int, list[uih.TierFile]] = {}
        schema = pa.schema([pa.field(c, t) for c, t in EVENT_COLUMNS.items()])
        if dt is not None:
            schema = pa.schema(dt.schema().to_arrow())
            for f in uih.list_files(dt):
                files.setdefault(f.bucket, []).append(f)
            for fl in files.values():
                # Newest data first helps nothing for correctness; keep a stable order.
                fl.sort(key=lambda f: f.path)
        # A trait added by a file ingested after the newest snapshot is in the raw log (and so
        # in tails) but not yet in the tier: it is a stored column all the same.
        raw = store.open_table("raw")
        if raw is not None:
            have = set(schema.names)
            schema = pa.schema([*schema, *(
                f for f in pa.schema(raw.schema().to_arrow())
                if f.name not in have and f.name not in ("source", "batch_id")
            )])
        tenant.check_columns(schema.names)
        heads_files: dict[int, list[str]] = {}
        hdt = store.open_table("heads")
        if hdt is not None:
            _, root = store.filesystem()
            at = pa.table(hdt.get_add_actions(flatten=True))
            if at.num_rows:
                for p, b in zip(at.column("path").to_pylist(),
                                at.column("partition.bucket").to_pylist(), strict=True):
                    heads_files.setdefault(int(b), []).append(f"{root}/heads/{p}")
        return cls(
            store,
            tenant,
            np.array([s.published_at for s in snaps], dtype=np.int64),
            np.array([s.watermark for s in snaps], dtype=np.int64),
            forgotten_users(store),
            files,
            schema,
            heads_files,
            verify,
        )


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def reconstruct_bucket(ctx: ReadContext, bucket: int, rows: pa.Table) -> Sequences:
    """Rebuild the tenant's sequences for thin ``rows`` that all lie in ``bucket``."""
    t = ctx.tenant
    L = t.max_len
    rid = rows.column("request_id").to_numpy()
    users = rows.column("user_id").to_numpy()
    T = rows.column("request_ts").to_numpy()
    S = rows.column("snapshot_id").to_numpy().astype(np.int64)
    R = len(rid)
    n_snap = len(ctx.watermarks)

    bad = np.flatnonzero((n_snap <= S) | (S < -1))
    if len(bad):
        i = bad[0]
        raise ThinTableError(
            f"request {rid[i]}: pointer names snapshot {S[i]}, which does not exist in "
            f"{ctx.store.root} ({n_snap} snapshots)"
        )
    newer = np.flatnonzero(resolve_snapshot(ctx.published_at, T) < S)
    if len(newer):
        i = newer[0]
        raise ThinTableError(
            f"request {rid[i]}: pointer names snapshot {S[i]}, published after the request time {T[i]}"
        )
    heads = HeadIndex.from_files(
        ctx.store.filesystem()[0], ctx.heads_files.get(bucket, []), users
    )
    if ctx.verify:
        exp_len, exp_cs = heads.pointers(users, S)
        hl = rows.column("head_len").to_numpy().astype(np.int64)
        cs = rows.column("head_checksum").to_numpy()
        mism = ((exp_len != hl) | (exp_cs != cs)) & ~np.isin(users, ctx.forgotten)
        if mism.any():
            i = np.flatnonzero(mism)[0]
            raise O2OConsistencyError(
                f"request {rid[i]}: O2O consistency error: user {users[i]}'s head at snapshot "
                f"{S[i]} has length {exp_len[i]} and checksum {int(exp_cs[i]) & 0xFFFFFFFFFFFFFFFF:#x}, "
                f"but the pointer says {hl[i]} and {int(cs[i]) & 0xFFFFFFFFFFFFFFFF:#x}"
            )
    w = t.window_us
    lo_ts = T - w if w is not None else None

    # --- head: one pruned read of the bucket serves every request in it
    uniq, inv = np.unique(users, return_inverse=True)
    if t.actions is None:
        cut_r = heads.cutoffs(users, S, L)
    else:
        cut_r = np.full(R, NO_MARKER, dtype=np.int64)
    if lo_ts is not None:
        # The window is a per-request lower bound too: push it down per user, not only as the
        # bucket-wide minimum (requests of one bucket span days; a user's do not, as much).
        cut_r = np.maximum(cut_r, lo_ts)
    cut_r = np.where(S >= 0, cut_r, INT64_MAX)
    cut_u = np.full(len(uniq), INT64_MAX, dtype=np.int64)
    np.minimum.at(cut_u, inv, cut_r)
    has_head = S >= 0
    br = uih.read_bucket(
        ctx.store,
        ctx.files.get(bucket, []) if has_head.any() else [],
        users=uniq[np.unique(inv[has_head])] if has_head.any() else uniq[:0],
        cutoffs=cut_u[np.unique(inv[has_head])] if has_head.any() else cut_u[:0],
        columns=t.columns,
        actions=t.action_array,
        max_snapshot=int(S.max(initial=-1)),
        min_ts=int(lo_ts.min()) if lo_ts is not None and R else None,
        schema=ctx.schema,
    )
    E = br.table
    eu = E.column("user_id").to_numpy()
    ets = E.column("event_ts").to_numpy()
    esn = E.column("snapshot_id").to_numpy()
    e_end = np.searchsorted(eu, users, side="right")
    lo = (
        searchsorted2(eu, ets, users, lo_ts)
        if lo_ts is not None
        else np.searchsorted(eu, users, side="left")
    )
    h_own, h_idx = _select_heads(eu, esn, lo, e_end, S, has_head, L)

    # --- head candidates, grouped by request, each run ascending
    need = list(dict.fromkeys(["event_ts", "event_id", *t.columns,
                               *(["action"] if t.actions is not None else [])]))

    # --- tails: stored (streaming) or from the raw log (batch), filtered like the head
    tail_parts: list[pa.Table] = []
    t_owners: list[np.ndarray] = []
    tail_len = _column(rows, "tail_len")
    streamed = np.asarray(tail_len.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if streamed.any():
        lens = pc.fill_null(tail_len, 0).to_numpy()
        n_ev = int(lens.sum())
        tail_parts.append(pa.table({
            c: (_tail_values(_column(rows, TAIL_PREFIX + c), lens, rid)
                if TAIL_PREFIX + c in rows.column_names
                else pa.nulls(n_ev, ctx.schema.field(c).type))
            for c in need
        }))
        t_owners.append(np.repeat(np.arange(R), lens))
    batch = np.flatnonzero(~streamed)
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
    tails = (
        pa.concat_tables([p.cast(pa.schema([ctx.schema.field(c) for c in need]))
                          for p in tail_parts]).combine_chunks()
        if tail_parts else None
    )
    t_own = np.concatenate(t_owners) if t_owners else np.zeros(0, np.int64)
    tail_events = len(t_own)
    t_idx = np.arange(len(t_own), dtype=np.int64)
    if tails is not None and len(t_own):
        tts = tails.column("event_ts").to_numpy()
        tid = tails.column("event_id").to_numpy()
        k = np.ones(len(t_own), dtype=bool)
        if t.actions is not None:
            k &= np.isin(tails.column("action").to_numpy(zero_copy_only=False), t.action_array)  # type: ignore[arg-type]
        if lo_ts is not None:
            k &= tts >= lo_ts[t_own]
        o = np.lexsort((tid[k], tts[k], t_own[k]))
        t_idx = np.flatnonzero(k)[o]
        t_own = t_own[t_idx]

    # --- merge: each tail event is inserted into its request's head run by binary search
    # (tails are short, heads long: no sort of the candidates), then the last L are kept
    n_h = np.bincount(h_own, minlength=R)
    n_t = np.bincount(t_own, minlength=R)
    tot = n_h + n_t
    h_start = np.cumsum(n_h) - n_h
    t_start = np.cumsum(n_t) - n_t
    h_rank = np.arange(len(h_own)) - h_start[h_own]
    t_rank = np.arange(len(t_own)) - t_start[t_own]
    if len(t_own) and len(h_own):
        eid = E.column("event_id").to_numpy()
        p_t = _insertion_points(eu, ets, eid, users[t_own], tts[t_idx], tid[t_idx])
        nn = np.int64(len(eu) + 1)
        cnt_less = np.searchsorted(h_own * nn + h_idx, t_own * nn + p_t, side="left")
        cnt_less = cnt_less - h_start[t_own]
        # Only requests with a tail event before their head's end (late arrivals) need their
        # head shifted; for the rest the tail simply follows the head.
        inter = np.zeros(R, dtype=bool)
        inter[t_own[cnt_less < n_h[t_own]]] = True
        h_shift = np.zeros(len(h_own), dtype=np.int64)
        if inter.any():
            sel_r = np.flatnonzero(inter)
            o_h, p_h = expand_ranges(h_start[sel_r], h_start[sel_r] + n_h[sel_r])
            t_sel = inter[t_own]
            sub_n = n_h[sel_r]
            remap = np.full(R, -1, dtype=np.int64)
            remap[sel_r] = np.arange(len(sel_r))
            h_shift[p_h] = _insert_shift(
                sub_n, o_h, h_rank[p_h], remap[t_own[t_sel]], cnt_less[t_sel]
            )
    else:
        cnt_less = n_h[t_own]
        h_shift = np.zeros(len(h_own), dtype=np.int64)
    h_dest = h_rank + h_shift
    t_dest = cnt_less + t_rank
    drop = np.maximum(tot - L, 0)
    lengths = np.minimum(tot, L).astype(np.int64)
    new_start = np.cumsum(lengths) - lengths
    hk = h_dest >= drop[h_own]
    tk = t_dest >= drop[t_own]
    n_out = int(lengths.sum())
    idx = np.empty(n_out, dtype=np.int64)
    src_tail = np.zeros(n_out, dtype=bool)
    idx[(new_start - drop)[h_own[hk]] + h_dest[hk]] = h_idx[hk]
    t_slots = (new_start - drop)[t_own[tk]] + t_dest[tk]
    idx[t_slots] = t_idx[tk]
    src_tail[t_slots] = True
    values = {c: _gather(E.column(c), tails.column(c) if tails is not None else None, idx, src_tail)
              for c in t.columns}
    ctx_cols = [c for c in rows.column_names if is_context_column(c)]
    return Sequences(
        rid, users, T, lengths, values, rows.select(ctx_cols),
        br.bytes_read,
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
    want = [*THIN_KEYS, *(TAIL_PREFIX + c for c in event_columns(tenant))]
    return [c for c in want if c in names]


def is_context_column(name: str) -> bool:
    """A ride-along request column (not a key, pointer or tail field)."""
    return name not in THIN_KEYS and not name.startswith(TAIL_PREFIX)


def _select_heads(
    eu: np.ndarray, esn: np.ndarray, lo: np.ndarray, e_end: np.ndarray, S: np.ndarray,
    has_head: np.ndarray, L: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(request, row) of the last ``L`` head rows of each request, grouped by request, ascending.

    The head of a request is its user's rows in ``[lo, e_end)`` (rows sorted by user, then
    time) with ``snapshot_id <= S``. A row is *regular* if no later row of its user has a
    smaller ``snapshot_id``; along a user's regular rows ``snapshot_id`` never decreases, so the
    qualifying regular rows are a prefix and their last ``L`` one contiguous window, found by
    binary search. The other rows (events that arrived late, after newer ones) are few: only
    those after the window's start can be among the last ``L``, and only those are looked at.
    Work is proportional to the output, whatever the number of snapshots.
    """
    R = len(S)
    n = len(eu)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n == 0 or not has_head.any():
        return empty
    ui = np.concatenate([[0], np.cumsum(eu[1:] != eu[:-1])]).astype(np.int64)
    big = int(esn.max()) + 2
    key = ui * big + esn.astype(np.int64)
    # Suffix minimum per user: later users have larger keys, so one reversed scan suffices.
    regular = key <= np.minimum.accumulate(key[::-1])[::-1]
    reg = np.flatnonzero(regular)
    present = has_head & (e_end > lo)
    u_r = np.where(present, ui[np.minimum(lo, n - 1)], 0)
    # Regular rows of the user with snapshot_id <= S end at the first regular key > (u, S).
    reg_key = key[reg]
    reg_end = np.searchsorted(reg_key, u_r * big + S + 1, side="left")
    cum_reg = np.concatenate([[0], np.cumsum(regular)])
    reg_lo = cum_reg[lo]
    reg_start = np.maximum(reg_lo, reg_end - L)
    reg_start = np.where(present, np.minimum(reg_start, reg_end), reg_end)
    irr = np.flatnonzero(~regular)
    if len(irr) == 0:
        own, rpos = expand_ranges(reg_start, np.where(present, reg_end, reg_start))
        return own, reg[rpos]
    # With late rows the head is every qualifying row of one contiguous row range: no regular
    # row with snapshot_id > S can come before a qualifying row (it would not be regular), so
    # the range [first, end) holds the window's regular rows, the qualifying late rows, and
    # only late rows of later snapshots besides, which a mask removes. Late rows before the
    # window's first row cannot be among the last L when the window was cut at L.
    cut = reg_start > reg_lo
    has_reg = reg_end > reg_start
    first = np.where(cut & has_reg, reg[np.minimum(reg_start, len(reg) - 1)], lo)
    first = np.maximum(first, lo)
    end = np.where(has_reg, reg[np.maximum(reg_end - 1, 0)] + 1, first)
    i0 = np.searchsorted(irr, first, side="left")
    i1 = np.where(present, np.searchsorted(irr, e_end, side="left"), i0)
    io, ip = expand_ranges(i0, i1)
    ip = irr[ip]
    q = esn[ip] <= S[io]
    if q.any():
        last = np.zeros(R, dtype=np.int64)
        np.maximum.at(last, io[q], ip[q] + 1)
        end = np.maximum(end, last)
    end = np.where(present, np.maximum(end, first), first)
    own, pos = expand_ranges(first, end)
    m = esn[pos] <= S[own]
    if not m.all():
        own, pos = own[m], pos[m]
    cnt = np.bincount(own, minlength=R)
    if (cnt <= L).all():
        return own, pos
    seg_end = np.cumsum(cnt)
    keep_n = np.minimum(cnt, L)
    o2, p2 = expand_ranges(seg_end - keep_n, seg_end)
    return o2, pos[p2]


def _insert_shift(
    n_run: np.ndarray, own: np.ndarray, rank: np.ndarray, ins_own: np.ndarray,
    ins_before: np.ndarray,
) -> np.ndarray:
    """For each run element (request ``own``, rank ``rank`` in its run), how many inserted
    elements of the same request go before it: those with ``ins_before <= rank``.

    One histogram and one running sum over the runs (no search, no sort)."""
    size = n_run + 1
    seg = np.cumsum(size) - size
    counts = np.bincount(seg[ins_own] + ins_before, minlength=int(size.sum()))
    cs = np.cumsum(counts)
    base = np.where(seg > 0, cs[np.maximum(seg - 1, 0)], 0)
    return cs[seg[own] + rank] - base[own]


def _insertion_points(
    eu: np.ndarray, ets: np.ndarray, eid: np.ndarray,
    qu: np.ndarray, qts: np.ndarray, qid: np.ndarray,
) -> np.ndarray:
    """First row index with (user, ts, id) >= each query, in rows sorted by (user, ts, id)."""
    n = len(eu)
    if n == 0:
        return np.zeros(len(qu), dtype=np.int64)
    ui = np.concatenate([[0], np.cumsum(eu[1:] != eu[:-1])]).astype(np.int64)
    s_u = np.searchsorted(eu, qu, side="left")
    present = (s_u < n) & (eu[np.minimum(s_u, n - 1)] == qu)
    tmin = min(int(ets.min()), int(qts.min()))
    span = max(int(ets.max()), int(qts.max())) - tmin + 2
    if (int(ui[-1]) + 2) * span < (1 << 62):
        key = ui * np.int64(span) + (ets - tmin)
        qk = np.where(present, ui[np.minimum(s_u, n - 1)], 0) * np.int64(span) + (qts - tmin)
        p = np.searchsorted(key, qk, side="left")
        q_end = np.searchsorted(key, qk + 1, side="left")
    else:
        p = searchsorted2(eu, ets, qu, qts)
        q_end = searchsorted2(eu, ets, qu, qts + 1)
    p = np.where(present, p, s_u)
    q_end = np.where(present, q_end, s_u)
    ties = np.flatnonzero(q_end > p)
    if len(ties):
        # Same user and event_ts: order by event_id.
        own, pos = expand_ranges(p[ties], q_end[ties])
        less = np.bincount(own, weights=(eid[pos] < qid[ties][own]), minlength=len(ties))
        p[ties] += less.astype(np.int64)
    return p


def _tail_values(col: pa.Array, lens: np.ndarray, rid: np.ndarray) -> pa.Array:
    """Flattened values of one tail column; each row's list must hold ``tail_len`` values.

    A row logged before a trait column existed has a null list in that column (the thin table's
    schema grew later): its tail events get nulls there, as they have in the raw log.
    """
    got = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
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


def _gather(
    head: pa.ChunkedArray | pa.Array, tail: pa.ChunkedArray | pa.Array | None,
    idx: np.ndarray, src_tail: np.ndarray,
) -> pa.Array:
    """Values at ``idx`` of the head column (``src_tail`` false) or the tail column (true)."""
    h = head.combine_chunks() if isinstance(head, pa.ChunkedArray) else head
    if tail is None or not src_tail.any():
        return h.take(pa.array(idx))
    tl = tail.combine_chunks() if isinstance(tail, pa.ChunkedArray) else tail
    fixed = pa.types.is_integer(h.type) or pa.types.is_floating(h.type)
    if fixed and h.null_count == 0 and tl.null_count == 0:
        hv, tv = h.to_numpy(), tl.to_numpy()
        out = np.empty(len(idx), dtype=hv.dtype)
        m = ~src_tail
        out[m] = hv[idx[m]]
        out[src_tail] = tv[idx[src_tail]]
        return pa.array(out, type=h.type)
    both = pa.concat_arrays([h, tl.cast(h.type)])
    return both.take(pa.array(np.where(src_tail, idx + len(h), idx)))


def _grouped(owner: np.ndarray) -> bool:
    return bool(len(owner) < 2 or (np.diff(owner) >= 0).all())


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
        rows = ds.to_table(filter=pads.field("bucket") == b, columns=cols)
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
