"""Compiled inner loops of the reconstruction kernel (numba, GIL released).

The numpy kernel in :mod:`lmat_platform.reconstruct` plans every request's sequence as a list
of *segments*: contiguous runs of the bucket's head rows or of its sorted tail events, in
*virtual* positions (head rows first, then tail events)::

    virtual:  [ head rows 0 .. n_head-1 | tail events n_head .. n_head+n_tail-1 ]
    segment i copies virtual [s0[i], s1[i]) to the output, right after segment i-1

    request 0: head[10:14] + tail[0:2]    ->  s0 = [10, n_head+0]   s1 = [14, n_head+2]

A segment never straddles the two sources. Copying them is the only output-sized work of a
read, so it is one pass of slice copies at memory bandwidth (no index arrays, no gathers), on
the values' raw bytes: one compiled loop per element width serves every fixed-width type.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Unsigned integer of each element width: fixed-width columns are copied as raw bytes.
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@njit(cache=True, nogil=True)
def _copy_segments(head, tail, n_head, s0, s1, out):  # type: ignore[no-untyped-def,unused-ignore]
    o = 0
    for i in range(len(s0)):
        a = s0[i]
        b = s1[i]
        n = b - a
        if n <= 0:
            continue
        if a >= n_head:
            out[o:o + n] = tail[a - n_head:b - n_head]
        else:
            out[o:o + n] = head[a:b]
        o += n
    return o


def copy_segments(
    head: np.ndarray, tail: np.ndarray | None, s0: np.ndarray, s1: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The concatenation of virtual segments ``[s0[i], s1[i])`` over ``head`` then ``tail``.

    ``head`` and ``tail`` are 1-D arrays of one fixed-width dtype; the result is written to
    ``out`` (contiguous, that dtype, exactly the total length) or to a new array."""
    if tail is None:
        tail = head[:0]
    if tail.dtype != head.dtype:
        raise TypeError(f"head is {head.dtype} but tail is {tail.dtype}")
    n = np.maximum(s1 - s0, 0)
    total = int(n.sum())
    if out is None:
        out = np.empty(total, dtype=head.dtype)
    elif out.shape != (total,) or out.dtype != head.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous {head.dtype}[{total}], got "
                         f"{out.dtype}{list(out.shape)}")
    if total == 0:
        return out
    # The compiled loop does not check bounds: check every segment lies in one source.
    nh, nt = len(head), len(tail)
    ok = (n == 0) | ((s0 >= 0) & (s1 <= nh)) | ((s0 >= nh) & (s1 <= nh + nt))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise IndexError(f"segment [{s0[i]}, {s1[i]}) is outside head ({nh}) and tail ({nt})")
    raw = _RAW.get(head.dtype.itemsize)
    if raw is None:
        raise TypeError(f"no raw copy for {head.dtype} ({head.dtype.itemsize} bytes)")
    h = np.ascontiguousarray(head).view(raw)
    t = np.ascontiguousarray(tail).view(raw)
    done = _copy_segments(h, t, len(head), s0.astype(np.int64, copy=False),
                          s1.astype(np.int64, copy=False), out.view(raw))
    if done != total:  # pragma: no cover - the loop copies exactly the planned lengths
        raise RuntimeError(f"copied {done} values, planned {total}")
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
def _tails_before(t_lo, t_end, tts, tid, last_ts, last_id, has_rows):  # type: ignore[no-untyped-def,unused-ignore]
    m = np.zeros(len(t_lo), dtype=np.int64)
    for r in range(len(t_lo)):
        if not has_rows[r]:
            continue
        lt = last_ts[r]
        li = last_id[r]
        j = t_lo[r]
        while j < t_end[r] and (tts[j] < lt or (tts[j] == lt and tid[j] < li)):
            j += 1
        m[r] = j - t_lo[r]
    return m


def tails_before(
    t_lo: np.ndarray, t_end: np.ndarray, tts: np.ndarray, tid: np.ndarray,
    last_ts: np.ndarray, last_id: np.ndarray, has_rows: np.ndarray,
) -> np.ndarray:
    """Per request ``r``: how many of its tail events ``[t_lo[r], t_end[r])``, ordered by
    ``(tts, tid)``, sort before ``(last_ts[r], last_id[r])`` (its last head row); 0 where
    ``has_rows[r]`` is False. Those events are a prefix, so the work is the prefixes' length
    plus one step per request, not the number of tail events."""
    R = len(t_lo)
    if not (len(t_end) == len(last_ts) == len(last_id) == len(has_rows) == R):
        raise ValueError("per-request arrays differ in length")
    if len(tts) != len(tid):
        raise ValueError(f"tail arrays differ in length: {len(tts)}, {len(tid)}")
    if R and ((t_lo < 0).any() or (t_end > len(tts)).any() or (t_lo > t_end).any()):
        raise IndexError(f"tail ranges outside the {len(tts)} tail events")
    return np.asarray(_tails_before(
        t_lo.astype(np.int64, copy=False), t_end.astype(np.int64, copy=False),
        tts.astype(np.int64, copy=False), tid.astype(np.int64, copy=False),
        last_ts.astype(np.int64, copy=False), last_id.astype(np.int64, copy=False),
        has_rows.astype(np.bool_, copy=False)))


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every kernel variant now.

    The loader calls this before it starts worker processes, so that workers only ever read
    the compiled cache and never race each other writing it."""
    for raw in _RAW.values():
        a = np.zeros(2, dtype=raw)
        copy_segments(a, a, np.array([0, 2]), np.array([1, 3]))
    z = np.zeros(2, dtype=np.int64)
    is_sorted3(z, z, z)
    tails_before(z, z, z, z, z, z, np.ones(2, dtype=np.bool_))
