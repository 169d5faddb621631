"""Deduplicated batches (RecD): each distinct sequence of a batch once, and per request the row
of its sequence, as TorchRec's ``KeyedJaggedTensor(..., inverse_indices=...)`` carries them.

Requests of one user close in time often see the same history: several impressions of one page
view, or requests between which nothing the tenant keeps arrived. A deduplicated batch holds
such a sequence once. Worked for B = 4, where requests 11 and 12 saw the same events::

    request_id       [ 11, 12, 13, 14 ]
    inverse_indices  [ 0,  0,  1,  2  ]      request i's sequence is row inverse_indices[i]
    lengths          [ 2,      0,  3  ]      U = 3 distinct sequences
    values[item]     [ 7  9 |    | 4  4  8 ]

    Batch.expand():  lengths [2, 2, 0, 3], values [7 9 7 9 4 4 8]   (the plain batch)

Duplicates are found from the copy plan, without reading any value. A request's sequence is a
list of segments over the plan's two sources: head rows (each event of a unit once) and tail
positions (where one event may have several copies: tails copied per request). Each request's
segments are rewritten as maximal runs of canonical positions (a tail position becomes the first
position of the batch's rows that holds the same event id), so two requests with equal runs
have equal sequences, value for value. Requests are grouped by (user, hash of runs) and every member's runs are
compared with its group's first, so a hash collision never merges different sequences. The test
is sufficient, not necessary: two requests that see one event in the head and in a later
snapshot's tail respectively stay apart (their batch is larger, never wrong).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from lmat_platform.reconstruct import SegmentPlan


@njit(cache=True, nogil=True)
def _runs(lo, hi, s0, s1, n_head, tail_id, has_ids):  # type: ignore[no-untyped-def,unused-ignore]
    """Each row's segments ``[lo[r], hi[r])`` of ``s0/s1`` as maximal runs of canonical
    positions (run offsets per row, run starts, run ends) and a hash of each row's runs. A tail
    position's canonical one is the first position these rows reach that holds the same event
    (an open-addressing table of event ids, sized to the tail positions they reach)."""
    R = len(lo)
    cap = 0
    m = 0
    for r in range(R):
        for k in range(lo[r], hi[r]):
            if s1[k] > s0[k]:
                if s0[k] < n_head or not has_ids:
                    cap += 1
                else:
                    cap += s1[k] - s0[k]
                    m += s1[k] - s0[k]
    size = 1
    bits = 0
    while size < 2 * m + 2:
        size *= 2
        bits += 1
    keys = np.empty(size, dtype=np.int64)
    vals = np.full(size, -1, dtype=np.int64)
    mask = size - 1
    ra = np.empty(cap, dtype=np.int64)
    rb = np.empty(cap, dtype=np.int64)
    off = np.zeros(R + 1, dtype=np.int64)
    h = np.empty(R, dtype=np.uint64)
    prime = np.uint64(1099511628211)
    n = 0
    for r in range(R):
        for k in range(lo[r], hi[r]):
            a = s0[k]
            b = s1[k]
            if b <= a:
                continue
            if a < n_head or not has_ids:
                if n > off[r] and rb[n - 1] == a:
                    rb[n - 1] = b
                else:
                    ra[n] = a
                    rb[n] = b
                    n += 1
                continue
            for p in range(a, b):
                e = tail_id[p - n_head]
                slot = np.int64((np.uint64(e) * np.uint64(11400714819323198485)) >> np.uint64(
                    64 - bits)) if bits else np.int64(0)
                while vals[slot] >= 0 and keys[slot] != e:
                    slot = (slot + 1) & mask
                if vals[slot] < 0:
                    keys[slot] = e
                    vals[slot] = p
                c = vals[slot]
                if n > off[r] and rb[n - 1] == c:
                    rb[n - 1] = c + 1
                else:
                    ra[n] = c
                    rb[n] = c + 1
                    n += 1
        off[r + 1] = n
        x = np.uint64(14695981039346656037)
        for j in range(off[r], n):
            x = (x ^ np.uint64(ra[j])) * prime
            x = (x ^ np.uint64(rb[j])) * prime
        h[r] = x
    return off, ra[:n], rb[:n], h


@njit(cache=True, nogil=True)
def _same_runs(off, ra, rb, rep):  # type: ignore[no-untyped-def,unused-ignore]
    """Per row, whether its runs equal those of row ``rep[r]``."""
    R = len(rep)
    out = np.ones(R, dtype=np.bool_)
    for r in range(R):
        q = rep[r]
        if q == r:
            continue
        n = off[r + 1] - off[r]
        if n != off[q + 1] - off[q]:
            out[r] = False
            continue
        for j in range(n):
            if ra[off[r] + j] != ra[off[q] + j] or rb[off[r] + j] != rb[off[q] + j]:
                out[r] = False
                break
    return out


def unique_rows(
    plan: SegmentPlan, rows: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicate the plan's ``rows`` (of ``users``): (positions in ``rows`` of the distinct
    sequences, in order of first occurrence; per row, the index of its sequence among them)."""
    R = len(rows)
    if R == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    n_head = len(next(iter(plan.head.values()))) if plan.head else 0
    ids = plan.tail_id
    off, ra, rb, h = _runs(plan.seg_off[rows], plan.seg_off[rows + 1], plan.s0, plan.s1,
                           n_head, ids if ids is not None else np.zeros(0, np.int64),
                           ids is not None)
    # Each row's candidate: the first row of its (user, hash) group, in row order.
    order = np.lexsort((np.arange(R), h, users))
    new = np.ones(R, dtype=bool)
    new[1:] = (users[order][1:] != users[order][:-1]) | (h[order][1:] != h[order][:-1])
    rep = np.empty(R, dtype=np.int64)
    rep[order] = order[new][np.cumsum(new) - 1]
    # A hash collision keeps the row apart (its own sequence).
    rep = np.where(_same_runs(off, ra, rb, rep), rep, np.arange(R))
    keep = np.flatnonzero(rep == np.arange(R))
    index = np.empty(R, dtype=np.int64)
    index[keep] = np.arange(len(keep))
    return keep, index[rep]


def dedup_pieces(pieces: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The loader's batch pieces (rows of one plan each) with their segments, lengths and value
    counts cut to each piece's distinct sequences, and every request's row among the batch's
    distinct sequences (a user's requests lie in one unit, so pieces share none)."""
    out, inverse = [], []
    base = 0
    for q in pieces:
        rows = q["rows"]
        rows = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        keep, index = unique_rows(q["plan"], rows, q["user_id"])
        s0, s1 = q["plan"].segments(rows[keep])
        lengths = q["lengths"][keep]
        out.append({**q, "s0": s0, "s1": s1, "lengths": lengths, "n": int(lengths.sum())})
        inverse.append(index + base)
        base += len(keep)
    return out, np.concatenate(inverse) if inverse else np.zeros(0, dtype=np.int64)
