"""Compiled inner loops of the reconstruction kernel (numba, GIL released).

The kernel in :mod:`lmat_platform.reconstruct` plans every request's sequence, in one call of
:func:`plan_sequences` per work unit, as a list of *segments*: contiguous runs of the bucket's
head rows or of its sorted tail events, in *virtual* positions (head rows first, then tail
events)::

    virtual:  [ head rows 0 .. n_head-1 | tail events n_head .. n_head+n_tail-1 ]
    segment i copies virtual [s0[i], s1[i]) to the output, right after segment i-1

    request 0: head[10:14] + tail[0:2]    ->  s0 = [10, n_head+0]   s1 = [14, n_head+2]

A segment never straddles the two sources. Copying them is the only output-sized work of a
read, so it is one pass of slice copies at memory bandwidth (no index arrays, no gathers): one
memcpy per segment on the values' raw bytes, whatever the element width, every column of a
plan in one compiled call.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Before any kernel is defined: a writable cache folder for them (see the module).
from lmat_platform import numba_cache  # noqa: F401

log = logging.getLogger(__name__)

#: Unsigned integer of each element width: fixed-width columns are copied as raw bytes.
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@intrinsic
def _memcpy(typingctx, dst, src, nbytes):  # type: ignore[no-untyped-def,unused-ignore]
    """``memcpy(dst, src, nbytes)`` on raw addresses (LLVM's memcpy intrinsic: the C library's
    vectorized copy, whatever the element width; no address is baked into cached code)."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def,unused-ignore]
        d, s_, n = args
        cgutils.raw_memcpy(builder, builder.inttoptr(d, cgutils.voidptr_t),
                           builder.inttoptr(s_, cgutils.voidptr_t), n, 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _copy_columns(src, dst, widths, n_head, n_tail, cap, s0, s1):  # type: ignore[no-untyped-def,unused-ignore]
    # Every segment is checked before anything is written (the copies do not check bounds):
    # -1 - i for a segment i outside both sources, -1 - len(s0) when the output is too small.
    total = 0
    for i in range(len(s0)):
        a = s0[i]
        b = s1[i]
        if b <= a:
            continue
        if not ((a >= 0 and b <= n_head) or (a >= n_head and b <= n_head + n_tail)):
            return -1 - i
        total += b - a
    if total > cap:
        return -1 - len(s0)
    for c in range(src.shape[1]):
        hp = src[0, c]
        tp = src[1, c]
        op = dst[c]
        w = widths[c]
        o = 0
        for i in range(len(s0)):
            a = s0[i]
            n = s1[i] - a
            if n <= 0:
                continue
            if a >= n_head:
                _memcpy(op + o * w, tp + (a - n_head) * w, n * w)  # type: ignore[call-arg,unused-ignore]
            else:
                _memcpy(op + o * w, hp + a * w, n * w)  # type: ignore[call-arg,unused-ignore]
            o += n
    return total


def _fixed_width(a: np.ndarray, what: str) -> None:
    if a.ndim != 1 or a.dtype.hasobject or a.dtype.itemsize not in _RAW:
        raise TypeError(f"no raw copy for {what} {a.dtype}{list(a.shape)} (1-D fixed-width "
                        "numeric, boolean or temporal values only)")


def _addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


class CopySources:
    """The columns of one plan as copy sources: each column's head rows then its tail events
    (checked once: 1-D fixed-width, one dtype per column, equal lengths across columns), whose
    segments :meth:`copy` writes into outputs. Keeps the (contiguous) sources alive."""

    def __init__(self, heads: list[np.ndarray], tails: list[np.ndarray | None]):
        if len(heads) != len(tails) or not heads:
            raise ValueError(f"one head and tail per column: got {len(heads)} and {len(tails)}")
        self.heads = [np.ascontiguousarray(h) for h in heads]
        self.tails = [np.ascontiguousarray(t) if t is not None else h[:0]
                      for h, t in zip(self.heads, tails, strict=True)]
        self.n_head = len(self.heads[0])
        self.n_tail = len(self.tails[0])
        for h, t in zip(self.heads, self.tails, strict=True):
            _fixed_width(h, "head")
            if t.dtype != h.dtype:
                raise TypeError(f"head is {h.dtype} but tail is {t.dtype}")
            if len(h) != self.n_head or len(t) != self.n_tail:
                raise ValueError("the columns of one plan must have equal head and tail lengths")
        self.dtypes = [h.dtype for h in self.heads]
        self.widths = np.array([h.itemsize for h in self.heads], dtype=np.int64)
        self.addr = np.array([[_addr(h) for h in self.heads], [_addr(t) for t in self.tails]],
                             dtype=np.int64)

    def copy(self, s0: np.ndarray, s1: np.ndarray, outs: list[np.ndarray], offset: int = 0) -> int:
        """Copy virtual segments ``[s0[i], s1[i])`` of every column, over its head rows then its
        tail events, to ``outs[c][offset:]``; returns the values copied per column. The
        segments are checked inside the compiled call (GIL released) before anything is
        written; then every column is copied with the C library's memcpy."""
        if len(outs) != len(self.heads):
            raise ValueError(f"one output per column: got {len(outs)} for {len(self.heads)}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        for dt, o in zip(self.dtypes, outs, strict=True):
            if o.dtype != dt or o.ndim != 1 or not o.flags.c_contiguous or not o.flags.writeable:
                raise ValueError(f"out must be writable contiguous {dt}, got "
                                 f"{o.dtype}{list(o.shape)}")
        i64 = np.int64
        s0 = s0.astype(i64, copy=False)
        s1 = s1.astype(i64, copy=False)
        if len(s0) != len(s1):
            raise ValueError(f"segment starts and ends differ in length: {len(s0)}, {len(s1)}")
        cap = min(len(o) for o in outs) - offset
        dst = np.array([_addr(o) + offset * o.itemsize for o in outs], dtype=i64)
        done = int(_copy_columns(self.addr, dst, self.widths, self.n_head, self.n_tail,
                                 max(cap, 0), s0, s1))
        if done == -1 - len(s0):
            total = int(np.maximum(s1 - s0, 0).sum())
            o = outs[0]
            raise ValueError(f"out must be contiguous {o.dtype}[{offset + total}], got "
                             f"{o.dtype}{list(o.shape)} from offset {offset}")
        if done < 0:
            i = -1 - done
            raise IndexError(f"segment [{s0[i]}, {s1[i]}) is outside head ({self.n_head}) and "
                             f"tail ({self.n_tail})")
        return done


def copy_columns(
    heads: list[np.ndarray], tails: list[np.ndarray | None], s0: np.ndarray, s1: np.ndarray,
    outs: list[np.ndarray], offset: int = 0,
) -> int:
    """Copy virtual segments ``[s0[i], s1[i])`` of several columns of one plan at once: column
    ``c``'s segments over ``heads[c]`` then ``tails[c]`` go to ``outs[c][offset:]``. Returns
    the values copied per column (see :class:`CopySources`, which a caller copying many times
    from the same sources keeps)."""
    if not (len(heads) == len(tails) == len(outs)) or not heads:
        raise ValueError(f"one head, tail and output per column: got {len(heads)}, "
                         f"{len(tails)} and {len(outs)}")
    return CopySources(heads, tails).copy(s0, s1, outs, offset)


def copy_segments(
    head: np.ndarray, tail: np.ndarray | None, s0: np.ndarray, s1: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The concatenation of virtual segments ``[s0[i], s1[i])`` over ``head`` then ``tail``.

    ``head`` and ``tail`` are 1-D arrays of one fixed-width dtype; the result is written to
    ``out`` (contiguous, that dtype, exactly the total length) or to a new array."""
    total = int(np.maximum(s1 - s0, 0).sum())
    if out is None:
        out = np.empty(total, dtype=head.dtype)
    elif out.shape != (total,) or out.dtype != head.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous {head.dtype}[{total}], got "
                         f"{out.dtype}{list(out.shape)}")
    copy_columns([head], [tail], s0, s1, [out])
    return out


@njit(cache=True, nogil=True)
def _sorted3(a, b, c):  # type: ignore[no-untyped-def,unused-ignore]
    for i in range(1, len(a)):
        if a[i] != a[i - 1]:
            if a[i] < a[i - 1]:
                return False
        elif b[i] != b[i - 1]:
            if b[i] < b[i - 1]:
                return False
        elif c[i] < c[i - 1]:
            return False
    return True


def is_sorted3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> bool:
    """Whether rows ``(a[i], b[i], c[i])`` are in non-decreasing lexicographic order (one pass,
    no temporaries)."""
    if not len(a) == len(b) == len(c):
        raise ValueError(f"lengths differ: {len(a)}, {len(b)}, {len(c)}")
    return bool(_sorted3(a, b, c))


@njit(cache=True, nogil=True)
def _merge_runs(a, b, c, bounds):  # type: ignore[no-untyped-def,unused-ignore]
    k = len(bounds) - 1
    pos = bounds[:k].copy()
    out = np.empty(bounds[k] - bounds[0], dtype=np.int64)
    # Each row is the least head among the runs: k comparisons a row (k is a bucket's files).
    for w in range(len(out)):
        best = -1
        q = 0
        for r in range(k):
            p = pos[r]
            if p < bounds[r + 1] and (best < 0 or a[p] < a[q] or (a[p] == a[q] and (
                    b[p] < b[q] or (b[p] == b[q] and c[p] < c[q])))):
                best = r
                q = p
        out[w] = q
        pos[best] += 1
    return out


def merge_sorted_runs(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, bounds: np.ndarray
) -> np.ndarray | None:
    """The order that merges runs ``[bounds[r], bounds[r + 1])`` of rows ``(a, b, c)``, each
    already in lexicographic order, into one (ties: the earlier run first): positions to take,
    one pass of ``len(bounds) - 1`` comparisons a row instead of a sort. None when a run is
    not sorted (checked, not assumed: the caller sorts then)."""
    if not len(a) == len(b) == len(c):
        raise ValueError(f"lengths differ: {len(a)}, {len(b)}, {len(c)}")
    bounds = np.asarray(bounds, dtype=np.int64)
    if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != len(a) or (np.diff(bounds) < 0).any():
        raise ValueError(f"merge_sorted_runs: bounds {bounds.tolist()} do not cut {len(a)} rows")
    i64 = np.int64
    a, b, c = a.astype(i64, copy=False), b.astype(i64, copy=False), c.astype(i64, copy=False)
    for r in range(len(bounds) - 1):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        if not _sorted3(a[lo:hi], b[lo:hi], c[lo:hi]):
            return None
    return _merge_runs(a, b, c, bounds)


@njit(cache=True, nogil=True, inline="always")
def _first_at_least(a, x, y, v):  # type: ignore[no-untyped-def,unused-ignore]
    """First index in [x, y) of sorted ``a`` with ``a[i] >= v`` (y if none)."""
    while x < y:
        mid = (x + y) // 2
        if a[mid] < v:
            x = mid + 1
        else:
            y = mid
    return x


@njit(cache=True, nogil=True, inline="always")
def _first_at_least_from_start(a, x, y, v):  # type: ignore[no-untyped-def,unused-ignore]
    """:func:`_first_at_least`, galloping forward from ``x``: touches only the start of the
    range when the answer lies near it (the next user's rows, the end of a user's rows)."""
    step = 1
    lo = x
    while lo + step < y and a[lo + step - 1] < v:
        lo += step
        step *= 2
    return _first_at_least(a, lo, min(lo + step, y), v)


@njit(cache=True, nogil=True, inline="always")
def _first_at_least_from_end(a, x, y, v):  # type: ignore[no-untyped-def,unused-ignore]
    """:func:`_first_at_least`, galloping back from ``y``: touches only the end of the range
    when the answer lies near it (a request's last L rows of a long history)."""
    step = 1
    hi = y
    while hi - step > x and a[hi - step] >= v:
        hi -= step
        step *= 2
    return _first_at_least(a, max(x, hi - step), hi, v)


@njit(cache=True, nogil=True)
def _head_ranges(eu, esn, lo, e_end, S, has_head, L):  # type: ignore[no-untyped-def,unused-ignore]
    n = len(eu)
    R = len(S)
    mono = True
    for r in range(1, R):
        if e_end[r] < e_end[r - 1]:
            mono = False
            break
    # Requests come grouped by user (e_end ascending) from every reader: no sort then.
    order = np.arange(R) if mono else np.argsort(e_end, kind="mergesort")
    # Regular rows: no later row of the same user has a smaller snapshot id. Only the rows some
    # request can use are classified: per user (its rows end at e_end), from the lowest lo of
    # its requests to its last row, in one reverse scan; then the user's requests are resolved
    # at once, while its rows are in cache. reg/reg_sn: each span's regular rows (ascending) and
    # their snapshot ids, irr: its irregular rows.
    reg = np.empty(n, dtype=np.int64)
    reg_sn = np.empty(n, dtype=np.int64)
    irr = np.empty(n, dtype=np.int64)
    first = np.empty(R, dtype=np.int64)
    end = np.empty(R, dtype=np.int64)
    k0 = np.zeros(R, dtype=np.int64)
    k1 = np.zeros(R, dtype=np.int64)
    n_holes = np.zeros(R, dtype=np.int64)
    n_reg = 0
    n_irr = 0
    i = 0
    while i < R:
        e = e_end[order[i]]
        a = e
        j = i
        while j < R and e_end[order[j]] == e:
            r = order[j]
            if has_head[r] and lo[r] < a:
                a = lo[r]
            j += 1
        reg0 = n_reg
        irr0 = n_irr
        if a < e:
            # Written back to front from the end of each block's room, then moved down.
            w_reg = n_reg + (e - a)
            w_irr = n_irr + (e - a)
            m = np.iinfo(np.int64).max
            for k in range(e - 1, a - 1, -1):
                v = esn[k]
                if v <= m:
                    w_reg -= 1
                    reg[w_reg] = k
                    reg_sn[w_reg] = v
                    m = v
                else:
                    w_irr -= 1
                    irr[w_irr] = k
            c = n_reg + (e - a) - w_reg
            for q in range(c):
                reg[n_reg + q] = reg[w_reg + q]
                reg_sn[n_reg + q] = reg_sn[w_reg + q]
            n_reg += c
            c = n_irr + (e - a) - w_irr
            for q in range(c):
                irr[n_irr + q] = irr[w_irr + q]
            n_irr += c
        prev = -1
        for jj in range(i, j):
            r = order[jj]
            if not (has_head[r] and e > lo[r]):
                first[r] = e
                end[r] = e
                continue
            if prev >= 0 and S[r] == S[prev] and lo[r] == lo[prev]:
                # The same head as the user's previous request (same snapshot, same cutoff):
                # most of a user's requests between two snapshots.
                first[r] = first[prev]
                end[r] = end[prev]
                k0[r] = k0[prev]
                k1[r] = k1[prev]
                n_holes[r] = n_holes[prev]
                continue
            prev = r
            # Along the user's regular rows snapshot ids never decrease: the qualifying ones
            # (snapshot_id <= S) are a prefix of those from lo on, found by binary search.
            reg_lo = _first_at_least(reg, reg0, n_reg, lo[r])
            reg_end = _first_at_least(reg_sn, reg_lo, n_reg, S[r] + 1)
            reg_start = max(reg_lo, reg_end - L)
            f = reg[reg_start] if reg_end > reg_start and reg_start > reg_lo else lo[r]
            f = max(f, lo[r])
            e_r = reg[reg_end - 1] + 1 if reg_end > reg_start else f
            # Late (irregular) rows inside the range whose snapshot is newer than S are holes. A
            # late row that qualifies never lies past ``e_r``: the smallest snapshot after it is
            # on a regular row, which qualifies too.
            k = _first_at_least(irr, irr0, n_irr, f)
            k0[r] = k
            while k < n_irr and irr[k] < e_r:
                n_holes[r] += esn[irr[k]] > S[r]
                k += 1
            k1[r] = k
            first[r] = f
            end[r] = e_r
        i = j
    hole_off = np.zeros(R + 1, dtype=np.int64)
    for r in range(R):
        hole_off[r + 1] = hole_off[r] + n_holes[r]
    hole_own = np.empty(hole_off[R], dtype=np.int64)
    hole_pos = np.empty(hole_off[R], dtype=np.int64)
    for r in range(R):
        if n_holes[r] == 0:
            continue
        o = hole_off[r]
        for k in range(k0[r], k1[r]):
            if esn[irr[k]] > S[r]:
                hole_own[o] = r
                hole_pos[o] = irr[k]
                o += 1
    return first, end, hole_own, hole_pos


def head_ranges(
    eu: np.ndarray, esn: np.ndarray, lo: np.ndarray, e_end: np.ndarray, S: np.ndarray,
    has_head: np.ndarray, L: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each request's head as one row range ``[first, end)`` minus a few *holes*.

    The head of a request is its user's rows in ``[lo, e_end)`` (rows sorted by user, then
    time) with ``snapshot_id <= S``. A row is *regular* if no later row of its user has a
    smaller ``snapshot_id``; along a user's regular rows ``snapshot_id`` never decreases, so the
    qualifying regular rows are a prefix, and their last ``L`` a window found by binary search.
    No regular row of a later snapshot can come before a qualifying row (it would not be
    regular), so the head's last ``L`` rows lie in ``[first, end)``, where the only rows to leave
    out are late rows of later snapshots: the holes, returned as (request, row), grouped by
    request and ascending. The range may hold a few more than ``L`` rows (late rows inside the
    window); the caller keeps the last ``L``. One pass over the rows, then work per request
    proportional to its late rows, not to its output, whatever the number of snapshots.
    """
    R = len(S)
    if not (len(lo) == len(e_end) == len(has_head) == R) or len(esn) != len(eu):
        raise ValueError("head_ranges: array lengths differ")
    if R and ((lo < 0).any() or (e_end > len(eu)).any()):
        raise IndexError(f"head ranges outside the {len(eu)} rows")
    i64 = np.int64
    out = _head_ranges(
        eu.astype(i64, copy=False), esn.astype(i64, copy=False), lo.astype(i64, copy=False),
        e_end.astype(i64, copy=False), S.astype(i64, copy=False),
        has_head.astype(np.bool_, copy=False), int(L))
    return out[0], out[1], out[2], out[3]


@njit(cache=True, nogil=True)
def _segments(first, end, hole_off, hole_pos, ins_off, ins_pos, ins_item, app_start, app_end, L):  # type: ignore[no-untyped-def,unused-ignore]
    R = len(first)
    bound = 0
    for r in range(R):
        k = (hole_off[r + 1] - hole_off[r]) + (ins_off[r + 1] - ins_off[r])
        bound += 2 * k + 2
    s0 = np.empty(bound, dtype=np.int64)
    s1 = np.empty(bound, dtype=np.int64)
    seg_off = np.zeros(R + 1, dtype=np.int64)
    lengths = np.zeros(R, dtype=np.int64)
    # Only non-empty segments are kept (about half would be empty: a head run cut short by an
    # insertion at its first row, or dropped by the cut to L): each is written, then kept by
    # advancing the write position or not, without a branch (no predictable pattern).
    w = 0
    for r in range(R):
        o = w
        prev = first[r]
        i = hole_off[r]
        j = ins_off[r]
        while i < hole_off[r + 1] or j < ins_off[r + 1]:
            p = 0
            if j < ins_off[r + 1]:
                p = min(max(ins_pos[j], first[r]), end[r])
            if j < ins_off[r + 1] and (i >= hole_off[r + 1] or p <= hole_pos[i]):
                # An insertion before row p (before a hole at the same row).
                s0[w] = prev
                s1[w] = max(p, prev)
                w += p > prev
                s0[w] = ins_item[j]
                s1[w] = ins_item[j] + 1
                w += 1
                prev = p
                j += 1
            else:
                p = hole_pos[i]
                s0[w] = prev
                s1[w] = max(p, prev)
                w += p > prev
                prev = p + 1
                i += 1
        s0[w] = prev
        s1[w] = max(end[r], prev)
        w += end[r] > prev
        s0[w] = app_start[r]
        s1[w] = app_end[r]
        w += app_end[r] > app_start[r]
        total = 0
        for q in range(o, w):
            total += s1[q] - s0[q]
        # Keep the last L: drop whole segments from the front, then cut into the next one.
        drop = total - L
        q = o
        while drop > 0 and s1[q] - s0[q] <= drop:
            drop -= s1[q] - s0[q]
            q += 1
        if drop > 0:
            s0[q] += drop
        if q > o:
            for k in range(q, w):
                s0[o + k - q] = s0[k]
                s1[o + k - q] = s1[k]
            w -= q - o
        seg_off[r + 1] = w
        lengths[r] = min(total, L)
    return lengths, seg_off, s0[:w], s1[:w]


def segments(
    first: np.ndarray, end: np.ndarray, hole_own: np.ndarray, hole_pos: np.ndarray,
    ins_own: np.ndarray, ins_pos: np.ndarray, ins_item: np.ndarray,
    app_start: np.ndarray, app_end: np.ndarray, L: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each request's last ``L`` events, in request order, as segment copies.

    A request's sequence is its head range ``[first, end)`` of the bucket's rows, less the
    holes, with single tail events inserted before row ``ins_pos`` (tail events that sort inside
    the head) and its remaining tail ``[app_start, app_end)`` appended; tail items and the
    appended block are given in *virtual* positions (rows of the bucket first, then tail
    events). Holes and insertions come grouped by request, each in order (holes ascending,
    insertions in sequence order, so non-decreasing ``ins_pos``); at one row an insertion goes
    before a hole. Everything is cut into contiguous segments, the first ``total - L`` elements
    dropped, and only non-empty segments kept; copying the segments (:func:`copy_segments`) is
    then the only output-sized pass.
    Returns (lengths per request, each request's first segment (and the total), segment
    starts, segment ends).
    """
    R = len(first)
    if (np.diff(hole_own) < 0).any() or (np.diff(ins_own) < 0).any():
        raise ValueError("segments: holes and insertions must be grouped by request")
    i64 = np.int64
    hole_off = np.concatenate([[0], np.cumsum(np.bincount(hole_own, minlength=R))]).astype(i64)
    ins_off = np.concatenate([[0], np.cumsum(np.bincount(ins_own, minlength=R))]).astype(i64)
    if len(hole_off) != R + 1 or len(ins_off) != R + 1:
        raise IndexError(f"segments: a hole or insertion names a request outside 0..{R - 1}")
    out = _segments(
        first.astype(i64, copy=False), end.astype(i64, copy=False), hole_off,
        hole_pos.astype(i64, copy=False), ins_off, ins_pos.astype(i64, copy=False),
        ins_item.astype(i64, copy=False), app_start.astype(i64, copy=False),
        app_end.astype(i64, copy=False), int(L))
    return out[0], out[1], out[2], out[3]


@njit(cache=True, nogil=True)
def _plan(eu, ets, eid, esn, u_start, e_end, h_min, S, has_head, t_start, t_end, t_min, tts, tid, L):  # type: ignore[no-untyped-def,unused-ignore]
    R = len(S)
    # Each request's head candidates start at its user's first row at or after h_min.
    lo = np.empty(R, dtype=np.int64)
    for r in range(R):
        if r and u_start[r] == u_start[r - 1] and e_end[r] == e_end[r - 1] \
                and h_min[r] == h_min[r - 1]:
            lo[r] = lo[r - 1]  # the user's previous request's: same rows, same cutoff
        else:
            lo[r] = _first_at_least_from_end(ets, u_start[r], e_end[r], h_min[r])
    first, end, hole_own, hole_pos = _head_ranges(eu, esn, lo, e_end, S, has_head, L)
    n_e = len(eu)
    hole_off = np.zeros(R + 1, dtype=np.int64)
    for k in range(len(hole_own)):
        hole_off[hole_own[k] + 1] += 1
    for r in range(R):
        hole_off[r + 1] += hole_off[r]
    # Each request's kept tail: events from its window on (a prefix cut: the tail is ordered),
    # and of those only the last L. Those sorting before the last head row are a prefix.
    t_a = np.empty(R, dtype=np.int64)
    ins_off = np.zeros(R + 1, dtype=np.int64)
    for r in range(R):
        # Only the last L can be kept: the window is searched for among those alone.
        a = max(t_start[r], t_end[r] - L)
        if a < t_end[r] and tts[a] < t_min[r]:
            a = _first_at_least(tts, a, t_end[r], t_min[r])
        t_a[r] = a
        j = a
        if end[r] > first[r]:
            lt = ets[end[r] - 1]
            li = eid[end[r] - 1]
            while j < t_end[r] and (tts[j] < lt or (tts[j] == lt and tid[j] < li)):
                j += 1
        ins_off[r + 1] = ins_off[r] + (j - a)
    # Where each inserted event goes: before the first head row that sorts at or after it, by
    # binary search over the request's head range (rows of one user, sorted by time and id).
    ins_pos = np.empty(ins_off[R], dtype=np.int64)
    ins_item = np.empty(ins_off[R], dtype=np.int64)
    app_start = np.empty(R, dtype=np.int64)
    app_end = np.empty(R, dtype=np.int64)
    for r in range(R):
        n_ins = ins_off[r + 1] - ins_off[r]
        # Consecutive requests of a user with the same head range mostly insert the same late
        # events (their tails overlap): a position found for the previous request is reused.
        same = r and first[r] == first[r - 1] and end[r] == end[r - 1]
        p = ins_off[r - 1] if same else 0
        p_end = ins_off[r] if same else 0
        for k in range(n_ins):
            q = t_a[r] + k
            while p < p_end and (tts[ins_item[p] - n_e] < tts[q] or (
                    tts[ins_item[p] - n_e] == tts[q] and tid[ins_item[p] - n_e] < tid[q])):
                p += 1
            if p < p_end and tts[ins_item[p] - n_e] == tts[q] and tid[ins_item[p] - n_e] == tid[q]:
                x = ins_pos[p]
            else:
                x = first[r]
                y = end[r]
                while x < y:
                    mid = (x + y) // 2
                    if ets[mid] < tts[q] or (ets[mid] == tts[q] and eid[mid] < tid[q]):
                        x = mid + 1
                    else:
                        y = mid
            ins_pos[ins_off[r] + k] = x
            ins_item[ins_off[r] + k] = n_e + q
        app_start[r] = n_e + t_a[r] + n_ins
        app_end[r] = n_e + t_end[r]
    return _segments(first, end, hole_off, hole_pos, ins_off, ins_pos, ins_item, app_start,
                     app_end, L)


def plan_sequences(
    eu: np.ndarray, ets: np.ndarray, eid: np.ndarray, esn: np.ndarray,
    u_start: np.ndarray, e_end: np.ndarray, h_min: np.ndarray, S: np.ndarray,
    has_head: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, t_min: np.ndarray,
    tts: np.ndarray, tid: np.ndarray, L: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every request's last ``L`` events as segment copies, planned in one compiled call.

    Head: the bucket's rows ``eu, ets, eid, esn`` (sorted by user, time, id); request ``r``'s
    user has rows ``[u_start[r], e_end[r])``, and its candidates are those with
    ``event_ts >= h_min[r]`` (its window, or an earliest time its last ``L`` can reach) and
    ``snapshot_id <= S[r]`` (see :func:`head_ranges`), none where ``has_head[r]`` is False.
    Tail: events ``[t_start[r], t_end[r])`` of ``tts, tid``, ordered by ``(tts, tid)`` within
    each request, of which those with ``tts >= t_min[r]`` count. The head and the tail are
    merged by ``(event_ts, event_id)`` (tail events that sort inside the head are inserted at
    their binary-searched row, the rest appended) and cut to the last ``L`` by
    :func:`segments`, in virtual positions (head rows, then tail events). Work is per request
    and per row some request can use, not per row of the bucket. Returns (lengths, segment
    offsets per request, segment starts, segment ends)."""
    R = len(S)
    per_request = (u_start, e_end, h_min, has_head, t_start, t_end, t_min)
    if any(len(a) != R for a in per_request) or not (len(eu) == len(ets) == len(eid) == len(esn)):
        raise ValueError("plan_sequences: array lengths differ")
    if len(tts) != len(tid):
        raise ValueError(f"tail arrays differ in length: {len(tts)}, {len(tid)}")
    i64 = np.int64
    u_start, e_end = u_start.astype(i64, copy=False), e_end.astype(i64, copy=False)
    t_start, t_end = t_start.astype(i64, copy=False), t_end.astype(i64, copy=False)
    bad = _bad_ranges(u_start, e_end, len(eu), t_start, t_end, len(tts))
    if bad == 1:
        raise IndexError(f"head ranges outside the {len(eu)} rows")
    if bad == 2:
        raise IndexError(f"tail ranges outside the {len(tts)} tail events")
    out = _plan(
        eu.astype(i64, copy=False), ets.astype(i64, copy=False), eid.astype(i64, copy=False),
        esn.astype(i64, copy=False), u_start, e_end, h_min.astype(i64, copy=False),
        S.astype(i64, copy=False), has_head.astype(np.bool_, copy=False), t_start, t_end,
        t_min.astype(i64, copy=False), tts.astype(i64, copy=False),
        tid.astype(i64, copy=False), int(L))
    return out[0], out[1], out[2], out[3]


@njit(cache=True, nogil=True)
def _bad_ranges(u_start, e_end, n_e, t_start, t_end, n_t):  # type: ignore[no-untyped-def,unused-ignore]
    """1: a head range outside [0, n_e) or reversed; 2: a tail range outside [0, n_t); else 0."""
    for r in range(len(u_start)):
        if u_start[r] < 0 or e_end[r] > n_e or u_start[r] > e_end[r]:
            return 1
    for r in range(len(t_start)):
        if t_start[r] < 0 or t_end[r] > n_t or t_start[r] > t_end[r]:
            return 2
    return 0


@njit(cache=True, nogil=True)
def _request_heads(users, S, T, published_at, n_snap, hu, hsn, hlen, hcs, hmark, forgotten, verify, hl, cs, window, has_window):  # type: ignore[no-untyped-def,unused-ignore]
    R = len(users)
    at = np.full(R, -1, dtype=np.int64)
    cut = np.empty(R, dtype=np.int64)
    i64min = np.iinfo(np.int64).min
    i64max = np.iinfo(np.int64).max
    nh = len(hu)
    for r in range(R):
        s = S[r]
        if s >= n_snap or s < -1:
            return 1, r, at, cut
        # The newest snapshot published at or before the request: it must not predate S.
        if _first_at_least(published_at, 0, len(published_at), T[r] + 1) - 1 < s:
            return 2, r, at, cut
        # The head entry of (user, S): the newest of the user's entries with snapshot <= S.
        u = users[r]
        a = _first_at_least(hu, 0, nh, u)
        b = _first_at_least(hu, a, nh, u + 1) if u < i64max else nh
        k = _first_at_least(hsn, a, b, s + 1) - 1
        if k >= a:
            at[r] = k
        if verify:
            el = hlen[k] if k >= a else 0
            ec = hcs[k] if k >= a else 0
            if el != hl[r] or ec != cs[r]:
                f = _first_at_least(forgotten, 0, len(forgotten), u)
                if not (f < len(forgotten) and forgotten[f] == u):
                    return 3, r, at, cut
        # The earliest event time the request's last L head events can have (its snapshot's
        # length marker; none: every row), raised to its window; no head at all: past every row.
        c = hmark[k] if k >= a and len(hmark) else i64min
        if has_window and T[r] - window > c:
            c = T[r] - window
        cut[r] = c if s >= 0 else i64max
    return 0, -1, at, cut


def request_heads(
    users: np.ndarray, S: np.ndarray, T: np.ndarray, published_at: np.ndarray, n_snap: int,
    head_user: np.ndarray, head_snapshot: np.ndarray, head_len: np.ndarray,
    head_checksum: np.ndarray, head_marker: np.ndarray | None, forgotten: np.ndarray,
    verify: bool, hl: np.ndarray, cs: np.ndarray, window: int | None,
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Every request's checks and head entry in one compiled pass (no array temporaries).

    For request ``r`` (user ``users[r]``, pointer snapshot ``S[r]``, time ``T[r]``): the head
    entry of its user at ``S[r]`` in a head index sorted by (user, snapshot) (-1: none); and
    its head cutoff: ``head_marker`` of that entry (the earliest event time its last L can
    have; none: int64 min), at least ``T[r] - window``, and int64 max where ``S[r] < 0``.
    Checks, the first failing request reported: ``(1, r)`` the snapshot does not exist
    (``n_snap`` snapshots), ``(2, r)`` it was published after the request
    (``published_at``, non-decreasing), ``(3, r)`` with ``verify``: the pointer's head length
    ``hl`` and checksum ``cs`` differ from the entry's (0 and 0 without one) and the user is
    not in sorted ``forgotten``. Returns (code, request, entries, cutoffs); code 0: all pass.
    """
    R = len(users)
    if not (len(S) == len(T) == len(hl) == len(cs) == R):
        raise ValueError("request_heads: request arrays differ in length")
    if not (len(head_user) == len(head_snapshot) == len(head_len) == len(head_checksum)):
        raise ValueError("request_heads: head index arrays differ in length")
    mark = np.zeros(0, dtype=np.int64) if head_marker is None else head_marker
    if head_marker is not None and len(mark) != len(head_user):
        raise ValueError("request_heads: one marker per head entry")
    i64 = np.int64
    code, r, at, cut = _request_heads(
        users.astype(i64, copy=False), S.astype(i64, copy=False), T.astype(i64, copy=False),
        published_at.astype(i64, copy=False), int(n_snap), head_user.astype(i64, copy=False),
        head_snapshot.astype(i64, copy=False), head_len.astype(i64, copy=False),
        head_checksum.astype(i64, copy=False), np.ascontiguousarray(mark, dtype=i64),
        forgotten.astype(i64, copy=False), bool(verify), hl.astype(i64, copy=False),
        cs.astype(i64, copy=False), int(window or 0), window is not None)
    return int(code), int(r), at, cut


@njit(cache=True, nogil=True)
def _user_ranges(eu, users):  # type: ignore[no-untyped-def,unused-ignore]
    R = len(users)
    n = len(eu)
    start = np.empty(R, dtype=np.int64)
    end = np.empty(R, dtype=np.int64)
    for r in range(R):
        u = users[r]
        if r and u == users[r - 1]:  # requests come grouped by user: one search per user
            start[r] = start[r - 1]
            end[r] = end[r - 1]
            continue
        # Users ascend too, mostly: a user's rows start at or after the last one's end.
        a = _first_at_least_from_start(eu, end[r - 1] if r and u > users[r - 1] else 0, n, u)
        start[r] = a
        end[r] = _first_at_least_from_start(eu, a, n, u + 1) if u < np.iinfo(np.int64).max \
            else n
    return start, end


def user_ranges(eu: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``users``' rows ``[start, end)`` in sorted ``eu`` (``searchsorted`` left and
    right), one search per run of equal users."""
    i64 = np.int64
    out = _user_ranges(eu.astype(i64, copy=False), users.astype(i64, copy=False))
    return out[0], out[1]


@njit(cache=True, nogil=True)
def _row_groups_wanted(umin, umax, tmax, smin, users, cutoffs, max_snapshot, min_ts):  # type: ignore[no-untyped-def,unused-ignore]
    out = np.empty(len(umin), dtype=np.int64)
    n = 0
    nu = len(users)
    for g in range(len(umin)):
        if smin[g] > max_snapshot or tmax[g] < min_ts:
            continue
        a = _first_at_least(users, 0, nu, umin[g])
        b = a
        # Users of the group: [a, b); the group is wanted if one of them can need a row as old
        # as its newest (a cutoff at or before tmax).
        wanted = False
        while b < nu and users[b] <= umax[g]:
            if cutoffs[b] <= tmax[g]:
                wanted = True
                break
            b += 1
        if wanted:
            out[n] = g
            n += 1
    return out[:n].copy()


def row_groups_wanted(
    umin: np.ndarray, umax: np.ndarray, tmax: np.ndarray, smin: np.ndarray,
    users: np.ndarray, cutoffs: np.ndarray, max_snapshot: int, min_ts: int | None,
) -> np.ndarray:
    """Row groups (by their user range ``[umin, umax]``, newest event ``tmax`` and smallest
    snapshot ``smin``) holding one of sorted ``users`` whose ``cutoffs`` (earliest event time it
    can need) is at or before ``tmax``, of no newer a snapshot than ``max_snapshot`` and not
    older than ``min_ts``; in one compiled pass."""
    if not (len(umin) == len(umax) == len(tmax) == len(smin)) or len(users) != len(cutoffs):
        raise ValueError("row_groups_wanted: array lengths differ")
    i64 = np.int64
    return _row_groups_wanted(
        umin.astype(i64, copy=False), umax.astype(i64, copy=False), tmax.astype(i64, copy=False),
        smin.astype(i64, copy=False), users.astype(i64, copy=False),
        cutoffs.astype(i64, copy=False), int(max_snapshot),
        np.iinfo(i64).min if min_ts is None else int(min_ts))


@njit(cache=True, nogil=True)
def _ranges_sorted(off, a, b):  # type: ignore[no-untyped-def,unused-ignore]
    for r in range(len(off) - 1):
        for i in range(off[r] + 1, off[r + 1]):
            if a[i] < a[i - 1] or (a[i] == a[i - 1] and b[i] < b[i - 1]):
                return False
    return True


def ranges_sorted(off: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether each range ``[off[r], off[r + 1])`` of ``(a, b)`` is in non-decreasing
    lexicographic order (one pass)."""
    if len(a) != len(b) or (len(off) and (off[0] < 0 or off[-1] > len(a) or (np.diff(off) < 0).any())):
        raise ValueError(f"ranges_sorted: bad offsets for {len(a)} and {len(b)} values")
    return bool(_ranges_sorted(off.astype(np.int64, copy=False), a.astype(np.int64, copy=False),
                               b.astype(np.int64, copy=False)))


@njit(cache=True, nogil=True)
def _spans_sorted(start, end, a, b):  # type: ignore[no-untyped-def,unused-ignore]
    out = np.ones(len(start), dtype=np.bool_)
    # The span before, when it starts where this one does and ends no later (a user's next
    # request: the same first event, a few more arrived): only the events past its end are
    # looked at.
    p_s = -1
    p_e = -1
    p_ok = True
    for r in range(len(start)):
        s = start[r]
        e = end[r]
        i0 = s + 1
        if s == p_s and e >= p_e:
            if not p_ok:
                out[r] = False
                p_e = e
                continue
            i0 = max(p_e, s + 1)
        for i in range(i0, e):
            if a[i] < a[i - 1] or (a[i] == a[i - 1] and b[i] < b[i - 1]):
                out[r] = False
                break
        p_s = s
        p_e = e
        p_ok = out[r]
    return out


def spans_sorted(start: np.ndarray, end: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per span ``[start[r], end[r])`` of ``(a, b)`` (spans may overlap), whether it is in
    non-decreasing lexicographic order (one pass over each span)."""
    if len(start) != len(end) or len(a) != len(b):
        raise ValueError("spans_sorted: array lengths differ")
    if len(start) and (int(start.min()) < 0 or int(end.max()) > len(a)
                       or bool((end < start).any())):
        raise ValueError(f"spans_sorted: a span lies outside {len(a)} values")
    return np.asarray(_spans_sorted(start.astype(np.int64, copy=False),
                                    end.astype(np.int64, copy=False),
                                    a.astype(np.int64, copy=False),
                                    b.astype(np.int64, copy=False)))


@njit(cache=True, nogil=True)
def _block_sorted_tails(ts, ids, b_lo, b_hi, r_blk, r_lo, r_hi, limit):  # type: ignore[no-untyped-def,unused-ignore]
    # Requests are grouped by block (r_blk non-decreasing). Each block is sorted once and kept
    # as one sorted copy; a request whose events are consecutive in it points into it, and
    # only a request with a gap (an event that sorts among its own but arrived after it) gets
    # a copy of its own, which the requests after it extend while they can: a request with the
    # same first event, whose events beyond the copy's all sort after the copy's last event,
    # is the copy followed by those (its user's next request: the same run, a few more events
    # arrived). Each request keeps only its last ``limit`` events in that order.
    R = len(r_lo)
    cap = 0
    prev = -1
    for j in range(R):
        cap += min(r_hi[j] - r_lo[j], limit)
        if r_blk[j] != prev:
            cap += b_hi[r_blk[j]] - b_lo[r_blk[j]]
            prev = r_blk[j]
    idx = np.empty(cap, dtype=np.int64)
    start = np.empty(R, dtype=np.int64)
    o = 0
    j = 0
    while j < R:
        blk = r_blk[j]
        lo = b_lo[blk]
        m = b_hi[blk] - lo
        o1 = np.argsort(ids[lo:lo + m], kind="mergesort")
        key_t = ts[lo:lo + m][o1]
        perm = o1[np.argsort(key_t, kind="mergesort")]
        base = o
        inv = np.empty(m, dtype=np.int64)  # each event's place in the sorted copy
        for k in range(m):
            idx[o] = lo + perm[k]
            inv[perm[k]] = k
            o += 1
        # The open copy, ending at o: its requests' first event (c_a), the end of the last
        # one's events (c_b), and the sorted place of the last event it holds (c_last).
        c_a = -1
        c_b = -1
        c_last = -1
        # The smallest and largest sorted place of the events [s_a, s_b): a user's next
        # requests share their first event and end later, so each request scans only the
        # events past the last one's (not its whole span again).
        s_a = -1
        s_b = -1
        s_first = 0
        s_last = 0
        while j < R and r_blk[j] == blk:
            # Only the request's own events are looked at (not the whole block).
            a = r_lo[j] - lo
            b = r_hi[j] - lo
            if b <= a:
                start[j] = base
                j += 1
                continue
            n = min(b - a, limit)
            if a == c_a and c_b <= b and b - c_b <= n:
                # Extends the open copy when its new events all sort after the copy's last.
                k_new = b - c_b
                ok = True
                for p in range(c_b, b):
                    if inv[p] < c_last:
                        ok = False
                        break
                if ok:
                    # The new events' sorted places, in order: an insertion sort in place
                    # (a few events; no array allocated per request).
                    for q in range(k_new):
                        x = inv[c_b + q]
                        w = o + q
                        while w > o and idx[w - 1] > x:
                            idx[w] = idx[w - 1]
                            w -= 1
                        idx[w] = x
                    if k_new:
                        c_last = idx[o + k_new - 1]
                    for q in range(k_new):
                        idx[o + q] = lo + perm[idx[o + q]]
                    o += k_new
                    c_b = b
                    start[j] = o - n
                    j += 1
                    continue
            if a != s_a or b < s_b:
                s_a = a
                s_b = a + 1
                s_first = inv[a]
                s_last = inv[a]
            for p in range(s_b, b):
                if inv[p] < s_first:
                    s_first = inv[p]
                if inv[p] > s_last:
                    s_last = inv[p]
            s_b = b
            first = s_first
            last = s_last
            if last - first + 1 == b - a:
                start[j] = base + last + 1 - n
            else:
                # Its last n in sorted order: walk the sorted block back from its last event,
                # past events of other requests (late arrivals sorted among its own).
                start[j] = o
                o += n
                w = o
                k = last
                while w > start[j]:
                    if a <= perm[k] < b:
                        w -= 1
                        idx[w] = lo + perm[k]
                    k -= 1
                c_a = a
                c_b = b
                c_last = last
            j += 1
    return idx[:o], start


def block_sorted_tails(
    ts: np.ndarray, ids: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray,
    r_blk: np.ndarray, r_lo: np.ndarray, r_hi: np.ndarray, limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each request's span ``[r_lo[j], r_hi[j])`` of its block ``[b_lo[r_blk[j]],
    b_hi[r_blk[j]])`` (events in arrival order) in ``(ts, ids)`` order: positions to gather,
    and where among them each request's ``r_hi[j] - r_lo[j]`` events start. Each block is
    sorted once (``r_blk`` grouped) and gathered once; a request's events start inside that
    sorted copy when they are consecutive in it, and only otherwise have their own copy.

    With ``limit``, a request keeps only its last ``min(r_hi[j] - r_lo[j], limit)`` events in
    that order (a tenant of ``max_len`` limit without an action filter needs no more of a
    tail): its copy is found by walking the sorted block back from its last event (stepping
    over other requests' events), so the copy follows the events kept; finding the span's
    first and last sorted positions still scans the span once."""
    if limit is not None and limit < 0:
        raise ValueError(f"block_sorted_tails: limit must be >= 0, got {limit}")
    if len(r_blk) and bool((np.diff(r_blk) < 0).any()):
        raise ValueError("block_sorted_tails: requests are not grouped by block")
    if len(r_blk) and (bool((r_lo < b_lo[r_blk]).any()) or bool((r_hi > b_hi[r_blk]).any())
                       or bool((r_hi < r_lo).any())):
        raise ValueError("block_sorted_tails: a request's span lies outside its block")
    if len(b_hi) and (int(b_lo.min(initial=0)) < 0 or int(b_hi.max()) > len(ts)):
        raise ValueError(f"block_sorted_tails: a block lies outside {len(ts)} events")
    i64 = np.int64
    idx, start = _block_sorted_tails(
        ts.astype(i64, copy=False), ids.astype(i64, copy=False), b_lo.astype(i64, copy=False),
        b_hi.astype(i64, copy=False), r_blk.astype(i64, copy=False),
        r_lo.astype(i64, copy=False), r_hi.astype(i64, copy=False),
        np.iinfo(np.int64).max if limit is None else int(limit))
    return idx, start


@njit(cache=True, nogil=True)
def _tail_runs(users, rids, lo, hi):  # type: ignore[no-untyped-def,unused-ignore]
    n = len(users)
    block = np.empty(n, dtype=np.int64)
    start = np.zeros(n, dtype=np.int32)
    stored = np.zeros(n, dtype=np.int64)
    run_a = np.empty(n, dtype=np.int64)
    run_b = np.empty(n, dtype=np.int64)
    nr = 0
    first = 0
    size = 0  # events stored for the current user so far
    cur = -1  # the user's current run (-1: none yet)
    for i in range(n):
        if i == 0 or users[i] != users[i - 1]:
            if i:
                stored[first] = size
            first = i
            size = 0
            cur = -1
        block[i] = rids[first]
        a = lo[i]
        b = hi[i]
        if b <= a:
            continue
        if cur >= 0 and run_a[cur] <= a and a <= run_b[cur]:
            base = size - (run_b[cur] - run_a[cur])
            if b > run_b[cur]:
                size += b - run_b[cur]
                run_b[cur] = b
            start[i] = base + (a - run_a[cur])
        else:
            run_a[nr] = a
            run_b[nr] = b
            cur = nr
            nr += 1
            start[i] = size
            size += b - a
    if n:
        stored[first] = size
    return block, start, stored, run_a[:nr], run_b[:nr]


def tail_runs(
    users: np.ndarray, request_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Requests grouped by user, each with its run ``[lo[i], hi[i])`` of its user's events:
    the union of each user's runs, stored once (in one compiled pass; see
    :func:`lmat_platform.protocol.thin.user_tail_blocks`). Returns per request the request id
    of its user's first row, its offset among its user's stored events and the events its own
    row stores (its user's total in the user's first row, else 0); then the stored runs'
    bounds, user after user."""
    if not (len(users) == len(request_ids) == len(lo) == len(hi)):
        raise ValueError("tail_runs: array lengths differ")
    i64 = np.int64
    block, start, stored, run_a, run_b = _tail_runs(
        users.astype(i64, copy=False), request_ids.astype(i64, copy=False),
        lo.astype(i64, copy=False), hi.astype(i64, copy=False))
    return block, start, stored, run_a, run_b


_WARM = False
_WARM_LOCK = threading.Lock()
#: The thread of :func:`warm_up_in_background`, while one was started.
_WARMING: threading.Thread | None = None


def warm_up() -> None:
    """Load from numba's on-disk cache (or compile, once per source change) every kernel
    variant the reader calls, now; once per process.

    The loader has this done before it starts worker processes, so that workers never race
    each other compiling; :func:`warm_up_in_background` starts it early in a thread. The
    first kernel call of a process also starts numba itself (about 0.8 s of an idle 2-core
    machine: its typing and lowering registries, and scipy, which numba imports to look for
    BLAS); only the kernels a pass calls are loaded, not the writer's or materialize's."""
    global _WARM
    if _WARM:
        return
    t = _WARMING
    if t is not None and t is not threading.current_thread():
        t.join()
    with _WARM_LOCK:
        if _WARM:
            return
        _skip_blas_probe()
        z = np.zeros(2, dtype=np.int64)
        b = np.ones(2, dtype=np.bool_)
        # numba loads one variant per read-only flag, and arrays decoded from Arrow are
        # read-only (r): these are the variants a pass calls, no others (a test checks that a
        # pass after warm_up loads none: tests/test_first_batch.py).
        r = z.copy()
        r.flags.writeable = False
        CopySources([z], [z]).copy(np.array([0, 2]), np.array([1, 3]), [np.zeros(2, np.int64)])
        is_sorted3(r, r, r)
        is_sorted3(z, r, r)
        ranges_sorted(np.zeros(3, dtype=np.int64), z, z)
        spans_sorted(z, z, r, r)
        block_sorted_tails(r, r, z[:1], z[:1], z[:0], z[:0], z[:0])
        request_heads(r, z, r, z, 1, r, z, r, r, z, z, True, z, r, None)
        row_groups_wanted(z, z, z, z, z, z, 0, None)
        merge_sorted_runs(z, z, z, np.array([0, 1, 2]))  # a bucket read from several files
        user_ranges(r, r)
        plan_sequences(r, r, r, z, z, z, z, z, b, z, z, z, r, r, 1)
        _WARM = True


def _skip_blas_probe() -> None:
    """numba's first compile or cache load in a process imports its lowering registries,
    among them ``numba.np.arraymath``, which imports ``scipy.linalg`` only to learn whether a
    BLAS is there (``_HAVE_BLAS``): 0.15-0.2 s of CPU, about 40% of numba's start-up here, and
    lmat's kernels use no BLAS. Unless ``scipy.linalg`` is imported already (then the probe is
    free) or ``LMAT_NUMBA_BLAS_PROBE=1``, ``numba.np.arraymath`` is imported while
    ``numba.np.linalg.ensure_blas`` (the probe it calls once, at its import) answers "no BLAS";
    ``numba.np.linalg``'s function is put back at once (no import is blocked, so other
    threads' imports of scipy are unaffected); ``numba.np.arraymath`` keeps the stand-in under
    its own name ``ensure_blas``, which it calls only at its import. The one effect: ``np.correlate`` and ``np.convolve`` compiled by numba in
    this process take numba's own inner-product loop instead of BLAS ``dot``; numba's
    ``np.dot`` and ``np.linalg`` look for BLAS themselves when compiled and are unchanged.

    The swap is made under numba's compiler lock, which numba itself holds when it imports
    its registries (the same lock order): another thread's compile, which calls
    ``ensure_blas`` typing ``np.dot`` or ``np.linalg``, never runs while it is swapped."""
    import sys

    if ("numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules
            or os.environ.get("LMAT_NUMBA_BLAS_PROBE") == "1"):
        return
    import numba.np.linalg as nl
    from numba.core.compiler_lock import global_compiler_lock

    def no_blas() -> None:
        raise ImportError("lmat: numba's BLAS probe skipped (LMAT_NUMBA_BLAS_PROBE=1 keeps it)")

    with global_compiler_lock:
        if "numba.np.arraymath" in sys.modules:  # imported by a compile we waited for
            return
        real = nl.ensure_blas
        nl.ensure_blas = no_blas
        try:
            import numba.np.arraymath  # noqa: F401
        finally:
            nl.ensure_blas = real


def _warm_up_logged() -> None:
    try:
        warm_up()
    except Exception:  # the caller's own warm_up() (or first kernel call) raises it again
        log.warning("warming up the kernels in the background failed", exc_info=True)


def warm_up_in_background() -> None:
    """Start :func:`warm_up` in a daemon thread (once per process), so that numba's start-up
    and the kernels' cache loads overlap what the process does meanwhile (its imports, a
    loader's log reads and first file reads); :func:`warm_up` waits for it. A fork waits for
    it too (``os.register_at_fork``), so no child inherits numba's compiler lock held."""
    global _WARMING
    if _WARM or _WARMING is not None:
        return
    with _WARM_LOCK:
        if _WARMING is not None:
            return
        _WARMING = threading.Thread(target=_warm_up_logged, name="lmat-kernels-warm-up",
                                    daemon=True)
        _WARMING.start()


def join_warm_up() -> None:
    """Wait for :func:`warm_up_in_background`'s thread if it is still loading kernels (before a
    fork, and at exit: numba's C++ code must not be cut short)."""
    t = _WARMING
    if t is not None and t.is_alive() and t is not threading.current_thread():
        t.join()


os.register_at_fork(before=join_warm_up)
