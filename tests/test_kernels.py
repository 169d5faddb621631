"""The compiled copy kernel, copy plans, batch buffers and the decoded cache (issue 6)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from lmat_platform.kernels import (
    CopySources,
    copy_columns,
    copy_segments,
    head_ranges,
    is_sorted3,
    plan_sequences,
    ranges_sorted,
    request_heads,
    row_groups_wanted,
    segments,
    user_ranges,
)
from lmat_platform.protocol.pointers import expand_positions
from lmat_platform.reader.buffers import MIN_BYTES, BufferPool
from lmat_platform.reconstruct import SegmentPlan
from lmat_platform.store.cache import DecodedCache, configure


def random_segments(rng: np.random.Generator, n_head: int, n_tail: int, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """k segments, each inside the head or inside the tail (some empty)."""
    in_tail = rng.random(k) < 0.4
    size = np.where(in_tail, n_tail, n_head)
    a = rng.integers(0, size + 1)
    b = np.minimum(a + rng.integers(0, 30, k), size)
    b = np.where(rng.random(k) < 0.1, a, b)  # empty segments
    off = np.where(in_tail, n_head, 0)
    return (a + off).astype(np.int64), (b + off).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint64,
                                   np.float32, np.float64, np.bool_])
def test_copy_segments_equals_a_gather(dtype: type) -> None:
    rng = np.random.default_rng(0)
    head = (rng.integers(0, 100, 500) % 2 if dtype is np.bool_
            else rng.integers(-50, 100, 500)).astype(dtype)
    tail = (rng.integers(0, 100, 80) % 2 if dtype is np.bool_
            else rng.integers(-50, 100, 80)).astype(dtype)
    s0, s1 = random_segments(rng, len(head), len(tail), 200)
    want = np.concatenate([head, tail])[expand_positions(s0, s1)]
    got = copy_segments(head, tail, s0, s1)
    assert got.dtype == head.dtype and got.flags.writeable
    np.testing.assert_array_equal(got, want)
    out = np.full(len(want), 7, dtype=dtype)
    assert copy_segments(head, tail, s0, s1, out) is out
    np.testing.assert_array_equal(out, want)


def test_copy_segments_rejects_bad_input() -> None:
    head = np.arange(10, dtype=np.int64)
    tail = np.arange(5, dtype=np.int64)
    with pytest.raises(IndexError, match=r"segment \[8, 12\) is outside head \(10\) and tail"):
        copy_segments(head, tail, np.array([8]), np.array([12]))  # straddles the two sources
    with pytest.raises(IndexError, match="outside"):
        copy_segments(head, tail, np.array([12]), np.array([16]))
    with pytest.raises(IndexError, match="outside"):
        copy_segments(head, tail, np.array([-1]), np.array([2]))
    with pytest.raises(TypeError, match="head is int64 but tail is int32"):
        copy_segments(head, tail.astype(np.int32), np.array([0]), np.array([1]))
    with pytest.raises(ValueError, match=r"out must be contiguous int64\[3\]"):
        copy_segments(head, tail, np.array([0]), np.array([3]), np.empty(4, np.int64))
    with pytest.raises(TypeError, match="no raw copy"):
        copy_segments(np.zeros(4, dtype="S3"), None, np.array([0]), np.array([1]))


def test_copy_columns_copies_every_column_of_a_plan_at_an_offset() -> None:
    rng = np.random.default_rng(4)
    dtypes = (np.int64, np.int16, np.float32, np.bool_, np.uint8)
    heads = [rng.integers(0, 100, 50).astype(d) for d in dtypes]
    tails = [rng.integers(0, 100, 20).astype(d) for d in dtypes]
    s0, s1 = random_segments(rng, 50, 20, 40)
    pos = expand_positions(s0, s1)
    total = len(pos)
    outs = [np.full(total + 7, 1, dtype=d) for d in dtypes]
    assert copy_columns(heads, tails, s0, s1, outs, 5) == total
    for h, t, o in zip(heads, tails, outs, strict=True):
        want = np.concatenate([h, t])[pos]
        assert np.array_equal(o[5:5 + total], want) and (o[:5] == 1).all() and (o[5 + total:] == 1).all()


def test_copy_columns_rejects_bad_input() -> None:
    h = np.arange(10, dtype=np.int64)
    s0, s1 = np.array([0]), np.array([4])
    with pytest.raises(TypeError, match="no raw copy for head object"):
        copy_columns([h.astype(object)], [None], s0, s1, [np.empty(4, object)])
    with pytest.raises(ValueError, match="one head, tail and output per column"):
        copy_columns([h, h], [None], s0, s1, [np.empty(4, np.int64)])
    with pytest.raises(ValueError, match="equal head and tail lengths"):
        copy_columns([h, h[:5]], [None, None], s0, s1, [np.empty(4, np.int64)] * 2)
    with pytest.raises(ValueError, match=r"out must be contiguous int64\[6\]"):
        copy_columns([h], [None], s0, s1, [np.empty(5, np.int64)], 2)
    with pytest.raises(IndexError, match="outside head"):
        copy_columns([h], [None], np.array([8]), np.array([12]), [np.empty(4, np.int64)])
    out = np.zeros(4, np.int64)
    copy_columns([h], [None], s0, s1, [out])
    assert out.tolist() == [0, 1, 2, 3]


def test_is_sorted3_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(0, 40))
        a, b, c = (rng.integers(0, 3, n) for _ in range(3))
        o = np.lexsort((c, b, a))
        a2, b2, c2 = a[o], b[o], c[o]
        assert is_sorted3(a2, b2, c2)
        rows = list(zip(a.tolist(), b.tolist(), c.tolist(), strict=True))
        assert is_sorted3(a, b, c) == (rows == sorted(rows))
    with pytest.raises(ValueError, match="lengths differ"):
        is_sorted3(np.zeros(2), np.zeros(2), np.zeros(3))


def test_plan_sequences_match_a_merge_of_head_and_tail() -> None:
    """The fused planner against the statement it implements: per request, its user's head rows
    at or after h_min of snapshots <= S, merged with its tail events at or after t_min by
    (event_ts, event_id), last L; late rows of any snapshot anywhere, several requests per
    user (each user's rows classified once, from its requests' lowest start)."""
    rng = np.random.default_rng(7)
    for _ in range(400):
        n_users = int(rng.integers(1, 4))
        n = int(rng.integers(0, 30))
        ids = rng.permutation(400)  # event ids are unique
        eu = np.sort(rng.integers(0, n_users, n))
        ets, eid = rng.integers(0, 10, n), ids[:n]
        o = np.lexsort((eid, ets, eu))
        eu, ets, eid = eu[o], ets[o], eid[o]
        esn = rng.integers(0, 3, n)
        R = int(rng.integers(1, 6))
        users = rng.integers(0, n_users, R)  # requests in any order
        S = rng.integers(-1, 3, R)
        t_min = rng.integers(-1, 5, R)
        h_min = rng.integers(-1, 8, R)
        u_start = np.searchsorted(eu, users, side="left")
        e_end = np.searchsorted(eu, users, side="right")
        nt = rng.integers(0, 8, R)
        t_end = np.cumsum(nt)
        t_start = t_end - nt
        own = np.repeat(np.arange(R), nt)
        tts, tid = rng.integers(0, 12, len(own)), ids[n:n + len(own)]
        o = np.lexsort((tid, tts, own))
        tts, tid = tts[o], tid[o]
        L = int(rng.integers(1, 12))
        lengths, off, s0, s1 = plan_sequences(eu, ets, eid, esn, u_start, e_end, h_min, S,
                                              S >= 0, t_start, t_end, t_min, tts, tid, L)
        assert (s1 > s0).all(), "only non-empty segments are planned"
        for r in range(R):
            cand = [((ets[i], eid[i]), i) for i in range(u_start[r], e_end[r])
                    if S[r] >= 0 and esn[i] <= S[r] and ets[i] >= h_min[r]]
            cand += [((tts[j], tid[j]), n + j) for j in range(t_start[r], t_end[r])
                     if tts[j] >= t_min[r]]
            want = [v for _, v in sorted(cand)][-L:]
            got = [v for q in range(off[r], off[r + 1]) for v in range(s0[q], s1[q])]
            assert got == want
            assert lengths[r] == len(want)


def _merge_oracle(eu, ets, eid, esn, u_start, e_end, h_min, S, t_start, t_end, t_min, tts,
                  tid, L, r):  # type: ignore[no-untyped-def]
    n = len(eu)
    cand = [((ets[i], eid[i]), i) for i in range(u_start[r], e_end[r])
            if S[r] >= 0 and esn[i] <= S[r] and ets[i] >= h_min[r]]
    cand += [((tts[j], tid[j]), n + j) for j in range(t_start[r], t_end[r]) if tts[j] >= t_min[r]]
    return [v for _, v in sorted(cand)][-L:]


def test_plan_sequences_share_work_across_a_users_streamed_requests() -> None:
    """Requests as a streaming log writes them: grouped by user in time order, snapshots that
    repeat and then advance, each tail a fresh copy of the user's events that arrived after its
    snapshot (late ones sort inside the head). Work the planner shares between a user's
    consecutive requests (head range, holes, inserted events' positions) must not change any
    sequence."""
    rng = np.random.default_rng(23)
    for _ in range(300):
        n_users = int(rng.integers(1, 4))
        n = int(rng.integers(0, 40))
        eu = np.sort(rng.integers(0, n_users, n))
        ets = rng.integers(0, 30, n)
        eid = rng.permutation(10_000)[:n]
        o = np.lexsort((eid, ets, eu))
        eu, ets, eid = eu[o], ets[o], eid[o]
        esn = np.sort(rng.integers(0, 3, n))
        late = rng.random(n) < 0.25
        esn[late] = rng.integers(0, 3, int(late.sum()))
        users, S, pieces = [], [], []
        next_id = 10_000
        for u in range(n_users):
            pool_ts = rng.integers(0, 40, int(rng.integers(0, 10)))  # late and new events
            pool_id = np.arange(next_id, next_id + len(pool_ts))
            next_id += len(pool_ts)
            k = int(rng.integers(0, 6))
            snaps = np.sort(rng.integers(-1, 3, k))
            for i in range(k):
                m = int(rng.integers(0, len(pool_ts) + 1)) if i == 0 else \
                    min(len(pool_ts), len(pieces[-1][0]) + int(rng.integers(0, 3)))
                ts_, id_ = pool_ts[:m], pool_id[:m]  # a copy of the events so far
                oo = np.lexsort((id_, ts_))
                pieces.append((ts_[oo], id_[oo]))
                users.append(u)
                S.append(snaps[i])
        R = len(users)
        if not R:
            continue
        users_a, S_a = np.array(users), np.array(S)
        nt = np.array([len(p[0]) for p in pieces])
        t_end = np.cumsum(nt)
        t_start = t_end - nt
        tts = np.concatenate([p[0] for p in pieces]).astype(np.int64)
        tid = np.concatenate([p[1] for p in pieces]).astype(np.int64)
        u_start = np.searchsorted(eu, users_a, side="left")
        e_end = np.searchsorted(eu, users_a, side="right")
        h_min = np.where(rng.random(R) < 0.7, 5, rng.integers(-1, 20, R))  # mostly repeated
        t_min = np.full(R, np.iinfo(np.int64).min)
        L = int(rng.integers(1, 15))
        lengths, off, s0, s1 = plan_sequences(eu, ets, eid, esn, u_start, e_end, h_min, S_a,
                                              S_a >= 0, t_start, t_end, t_min, tts, tid, L)
        for r in range(R):
            want = _merge_oracle(eu, ets, eid, esn, u_start, e_end, h_min, S_a, t_start, t_end,
                                 t_min, tts, tid, L, r)
            got = [v for q in range(off[r], off[r + 1]) for v in range(s0[q], s1[q])]
            assert got == want, (r, got, want)


def test_user_ranges_equal_searchsorted() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        eu = np.sort(rng.integers(0, 12, int(rng.integers(0, 40))))
        users = rng.integers(-1, 14, int(rng.integers(0, 20)))
        if rng.random() < 0.5:
            users = np.sort(users)  # grouped, as readers pass them
        a, b = user_ranges(eu, users)
        assert a.tolist() == np.searchsorted(eu, users, side="left").tolist()
        assert b.tolist() == np.searchsorted(eu, users, side="right").tolist()


def test_row_groups_wanted_match_a_per_group_scan() -> None:
    rng = np.random.default_rng(9)
    for _ in range(300):
        g = int(rng.integers(0, 12))
        umin = np.sort(rng.integers(0, 20, g))
        umax = umin + rng.integers(0, 4, g)
        tmax = rng.integers(0, 50, g)
        smin = rng.integers(0, 4, g)
        users = np.unique(rng.integers(0, 24, int(rng.integers(0, 10))))
        cut = rng.integers(0, 60, len(users))
        max_snap = int(rng.integers(0, 4))
        min_ts = None if rng.random() < 0.5 else int(rng.integers(0, 50))
        want = [i for i in range(g)
                if smin[i] <= max_snap and (min_ts is None or tmax[i] >= min_ts)
                and any(umin[i] <= u <= umax[i] and c <= tmax[i]
                        for u, c in zip(users, cut, strict=True))]
        got = row_groups_wanted(umin, umax, tmax, smin, users, cut, max_snap, min_ts)
        assert got.tolist() == want


def test_request_heads_look_up_check_and_cut() -> None:
    """Head entries, cutoffs and the three checks against a per-request statement of them."""
    rng = np.random.default_rng(13)
    NO = np.iinfo(np.int64).min
    for _ in range(300):
        k = int(rng.integers(0, 15))
        hu = np.sort(rng.integers(0, 6, k))
        hsn = rng.integers(0, 5, k)
        o = np.lexsort((hsn, hu))
        hu, hsn = hu[o], hsn[o]
        keep = np.r_[True, (hu[1:] != hu[:-1]) | (hsn[1:] != hsn[:-1])] if k else np.zeros(0, bool)
        hu, hsn = hu[keep], hsn[keep]
        hlen, hcs, mark = (rng.integers(0, 9, len(hu)) for _ in range(3))
        R = int(rng.integers(1, 8))
        users = rng.integers(0, 7, R)
        n_snap = 5
        S = rng.integers(-1, n_snap, R)
        pub = np.arange(n_snap) * 10
        T = np.maximum(S, 0) * 10 + rng.integers(0, 10, R)
        window = None if rng.random() < 0.5 else int(rng.integers(0, 30))
        forgotten = np.unique(rng.integers(0, 7, int(rng.integers(0, 3))))

        at = []
        for r in range(R):
            m = np.flatnonzero((hu == users[r]) & (hsn <= S[r]))
            at.append(int(m[-1]) if len(m) else -1)
        hl = np.array([hlen[i] if i >= 0 else 0 for i in at])
        cs = np.array([hcs[i] if i >= 0 else 0 for i in at])
        code, i, got_at, cut = request_heads(users, S, T, pub, n_snap, hu, hsn, hlen, hcs,
                                             mark, forgotten, True, hl, cs, window)
        assert (code, i) == (0, -1) and got_at.tolist() == at
        for r in range(R):
            c = mark[at[r]] if at[r] >= 0 else NO
            if window is not None:
                c = max(c, T[r] - window)
            assert cut[r] == (c if S[r] >= 0 else np.iinfo(np.int64).max)
        # Each check names the first request that fails it.
        r = int(rng.integers(0, R))
        bad = S.copy()
        bad[r] = n_snap
        assert request_heads(users, bad, T, pub, n_snap, hu, hsn, hlen, hcs, mark, forgotten,
                             True, hl, cs, window)[:2] == (1, r)
        if S[r] >= 1:
            early = T.copy()
            early[r] = pub[S[r]] - 1
            assert request_heads(users, S, early, pub, n_snap, hu, hsn, hlen, hcs, mark,
                                 forgotten, True, hl, cs, window)[:2] == (2, r)
        wrong = hl.copy()
        wrong[r] += 1
        got = request_heads(users, S, T, pub, n_snap, hu, hsn, hlen, hcs, mark, forgotten,
                            True, wrong, cs, window)[:2]
        assert got == ((0, -1) if users[r] in forgotten else (3, r))
        assert request_heads(users, S, T, pub, n_snap, hu, hsn, hlen, hcs, mark, forgotten,
                             False, wrong, cs, window)[:2] == (0, -1)


def test_copy_sources_serve_many_copies() -> None:
    rng = np.random.default_rng(4)
    heads = [rng.integers(0, 100, 50).astype(d) for d in (np.int64, np.int16)]
    tails = [rng.integers(0, 100, 20).astype(d) for d in (np.int64, np.int16)]
    src = CopySources(heads, tails)
    for _ in range(20):
        s0, s1 = random_segments(rng, 50, 20, 6)
        want = [np.concatenate([h, t])[expand_positions(s0, s1)]
                for h, t in zip(heads, tails, strict=True)]
        outs = [np.full(len(want[0]) + 3, -1, dtype=h.dtype) for h in heads]
        assert src.copy(s0, s1, outs, 3) == len(want[0])
        for o, w in zip(outs, want, strict=True):
            assert o[3:].tolist() == w.tolist() and (o[:3] == -1).all()
    with pytest.raises(ValueError, match="out must be writable contiguous int16"):
        src.copy(s0, s1, [outs[0], outs[0]])
    with pytest.raises(ValueError, match="one output per column"):
        src.copy(s0, s1, outs[:1])
    with pytest.raises(TypeError, match="head is int64 but tail is int16"):
        CopySources([heads[0]], [tails[1]])


def test_plan_sequences_rejects_bad_ranges() -> None:
    z = np.zeros(1, np.int64)
    yes = np.ones(1, bool)
    e = z[:0]
    with pytest.raises(IndexError, match="outside the 0 tail events"):
        plan_sequences(e, e, e, e, z, z, z, z, yes, z, z + 1, z, e, e, 1)
    with pytest.raises(IndexError, match="outside the 0 rows"):
        plan_sequences(e, e, e, e, z, z + 1, z, z, yes, z, z, z, e, e, 1)
    with pytest.raises(ValueError, match="differ in length"):
        plan_sequences(e, e, e, e, z, z, z, z, yes, z, z, z, z, e, 1)


def test_ranges_sorted_checks_each_range_alone() -> None:
    a = np.array([1, 2, 0, 5])
    b = np.array([0, 0, 9, 1])
    assert ranges_sorted(np.array([0, 2, 4]), a, b)  # 2 -> 0 crosses a range boundary
    assert not ranges_sorted(np.array([0, 4]), a, b)
    assert not ranges_sorted(np.array([0, 2]), np.array([1, 1]), np.array([3, 2]))
    with pytest.raises(ValueError, match="bad offsets"):
        ranges_sorted(np.array([0, 5]), a, b)


def test_head_ranges_match_a_row_by_row_scan() -> None:
    """Rows sorted by user then time, late rows of any snapshot anywhere: the range less its
    holes, cut to its last L rows, is exactly the user's rows with snapshot_id <= S."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        n_users = int(rng.integers(1, 4))
        sizes = rng.integers(0, 15, n_users)
        eu = np.repeat(np.arange(n_users) * 7, sizes)
        esn = np.concatenate([np.sort(rng.integers(0, 5, k)) for k in sizes]).astype(np.int64)
        late = rng.random(len(esn)) < 0.2  # late rows: any snapshot at any place
        esn[late] = rng.integers(0, 5, int(late.sum()))
        R = int(rng.integers(1, 8))
        u = rng.integers(0, n_users, R) * 7
        e_end = np.searchsorted(eu, u, side="right")
        start = np.searchsorted(eu, u, side="left")
        lo = start + rng.integers(0, 4, R).clip(max=e_end - start)
        S = rng.integers(-1, 5, R)
        has = S >= 0
        L = int(rng.integers(1, 10))
        first, end, h_own, h_pos = head_ranges(eu, esn, lo, e_end, S, has, L)
        for r in range(R):
            want = [i for i in range(lo[r], e_end[r]) if has[r] and esn[i] <= S[r]][-L:]
            holes = set(h_pos[h_own == r].tolist())
            got = [i for i in range(first[r], end[r]) if i not in holes][-L:]
            assert got == want, (r, got, want)


def test_segments_put_an_insertion_before_a_hole_at_the_same_row() -> None:
    # Head rows 0..5, hole at row 3, a tail event (virtual 10) inserted before row 3, then the
    # appended tail [11, 13): rows 0 1 2, event 10, rows 4 5, events 11 12.
    lengths, off, s0, s1 = segments(
        np.array([0]), np.array([6]), np.array([0]), np.array([3]),
        np.array([0]), np.array([3]), np.array([10]), np.array([11]), np.array([13]), 100)
    assert lengths.tolist() == [8] and off.tolist() == [0, len(s0)]
    vals = np.arange(20)
    assert copy_segments(vals[:10], vals[10:], s0, s1).tolist() == [0, 1, 2, 10, 4, 5, 11, 12]
    # The same, keeping the last 4: the first 4 elements are dropped.
    lengths, _, s0, s1 = segments(
        np.array([0]), np.array([6]), np.array([0]), np.array([3]),
        np.array([0]), np.array([3]), np.array([10]), np.array([11]), np.array([13]), 4)
    assert lengths.tolist() == [4]
    assert copy_segments(vals[:10], vals[10:], s0, s1).tolist() == [4, 5, 11, 12]
    with pytest.raises(ValueError, match="grouped by request"):
        segments(np.zeros(2, np.int64), np.ones(2, np.int64), np.array([1, 0]), np.array([0, 0]),
                 np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                 np.ones(2, np.int64), np.ones(2, np.int64), 3)


def test_plans_concatenate_and_cut_by_rows() -> None:
    rng = np.random.default_rng(2)
    plans, want = [], []
    for _ in range(3):
        head = {"x": rng.integers(0, 1000, 60)}
        tail = {"x": rng.integers(0, 1000, 20)}
        per = rng.integers(0, 4, 5)  # segments of each of 5 requests
        s0, s1 = random_segments(rng, 60, 20, int(per.sum()))
        off = np.concatenate([[0], np.cumsum(per)])
        p = SegmentPlan(off, s0, s1, head, tail)
        plans.append(p)
        both = np.concatenate([head["x"], tail["x"]])
        want += [both[expand_positions(s0[off[r]:off[r + 1]], s1[off[r]:off[r + 1]])]
                 for r in range(5)]
    plan = SegmentPlan.concat(plans)
    for rows in (slice(0, 15), slice(4, 11), np.array([14, 0, 7, 7, 3])):
        idx = np.arange(15)[rows]
        s0, s1 = plan.segments(rows)
        got = np.empty(int((s1 - s0).clip(0).sum()), np.int64)
        plan.copy_all(["x"], s0, s1, [got], 0)
        np.testing.assert_array_equal(got, np.concatenate([want[i] for i in idx]))


def test_buffer_pool_reuses_only_buffers_no_tensor_holds() -> None:
    pool = BufferPool()
    n = MIN_BYTES // 8
    a = pool.empty(n, np.int64)
    t = torch.from_numpy(a)
    del a
    b = pool.empty(n, np.int64)  # the first buffer is still behind t
    assert pool.allocated == 2 and pool.reused == 0
    view = t[3:9]
    del t, b
    gc.collect()
    c = pool.empty(n, np.float64)  # b's buffer is free; view still holds the first
    assert pool.allocated == 2 and pool.reused == 1
    c[:] = 1.5
    view_before = view.clone()
    d = pool.empty(n, np.int64)  # nothing free: a new buffer, the view's data untouched
    assert pool.allocated == 3
    d[:] = -1
    assert torch.equal(view, view_before)
    small = pool.empty(10, np.int64)
    assert small.nbytes == 80 and pool.allocated == 3


def test_decoded_cache_is_an_lru_bounded_in_bytes() -> None:
    dc = DecodedCache(max_bytes=100)
    dc.put("a", "A", 40)
    dc.put("b", "B", 40)
    assert dc.get("a") == "A"  # a is now the most recent
    dc.put("c", "C", 40)  # over budget: b goes
    assert dc.get("b") is None and dc.get("a") == "A" and dc.get("c") == "C"
    dc.put("huge", "H", 101)  # bigger than the budget: not kept
    assert dc.get("huge") is None
    s = dc.stats()
    assert s["bytes"] == 80 and s["entries"] == 2 and s["hits"] == 3 and s["misses"] == 2
    dc.clear()
    assert dc.get("a") is None and dc.stats()["bytes"] == 0


def test_decoded_cache_admits_scan_data_only_into_free_room() -> None:
    dc = DecodedCache(max_bytes=100)
    dc.put("tier", "T", 50)
    dc.put("scan1", "S1", 40, evict=False)
    dc.put("scan2", "S2", 40, evict=False)  # would evict: not kept, nothing else goes
    assert dc.get("tier") == "T" and dc.get("scan1") == "S1" and dc.get("scan2") is None
    dc.put("tier2", "T2", 40)  # evicting puts still make room as an LRU
    assert dc.get("tier2") == "T2" and dc.stats()["bytes"] <= 100


def test_decoded_cache_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmat_platform.store.cache as cache_mod

    monkeypatch.setattr(cache_mod, "_CACHE", None)
    monkeypatch.setenv("LMAT_DECODE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="LMAT_DECODE_CACHE_MB must be a number of MB, but got 'lots'"):
        cache_mod.cache()
    monkeypatch.setenv("LMAT_DECODE_CACHE_MB", "1.5")
    assert cache_mod.cache().max_bytes == int(1.5 * (1 << 20))
    with pytest.raises(ValueError, match=">= 0"):
        configure(-1)
    monkeypatch.setattr(cache_mod, "_CACHE", None)


def test_reads_with_and_without_the_cache_agree(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import lmat_platform as lmat
    from lmat_platform.reader import SequenceLoader
    from lmat_platform.store.cache import cache
    from tests.reader_fixtures import build_store

    rs = build_store(tmp_path)
    tenant = lmat.Tenant("t", ("item_id", "action", "dwell_ms", "event_ts"), 300)

    def run() -> list[tuple[list[int], list[int]]]:
        return [(b.request_id.tolist(), b.values["dwell_ms"].tolist())
                for b in SequenceLoader(rs.store, rs.thin, tenant=tenant, batch_size=64)]

    import lmat_platform.store.cache as cache_mod

    monkeypatch.setattr(cache_mod, "_CACHE", None)  # restored after the test
    configure(0)
    cold = run()
    dc = configure(64)
    first = run()
    hits = dc.stats()["hits"]
    thin = [k for k in list(dc._d) if k[0] == "thin" and "unit" not in k]
    assert thin, "a pass keeps its thin files' decoded columns"
    units = [k for k in list(dc._d) if "unit" in k]
    assert units, "a pass keeps its units' checked planner inputs"
    unit_hits = {k: dc._d[k] for k in units}
    second = run()
    assert cold == first == second
    assert all(dc._d[k] is v for k, v in unit_hits.items()), "the second pass reuses them"
    assert dc.stats()["hits"] > hits and dc.stats()["entries"] > 0
    assert cache() is dc
    # A budget that holds no thin file: the same sequences, nothing of the thin files kept.
    dc = configure(0.001)
    assert run() == cold and not [k for k in list(dc._d) if k[0] == "thin"]
    # Rows appended to a bucket (a new file in it): its rows are read again, and what was kept
    # for its old file set is dropped rather than left holding room.
    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake

    from lmat_platform.store.core import delta_dataset

    t = delta_dataset(DeltaTable(rs.thin)).to_table()
    b0 = t.column("bucket")[0].as_py()
    extra = t.filter(pc.equal(t.column("bucket"), b0)).slice(0, 3)
    top = pc.max(t.column("request_id")).as_py()
    extra = extra.set_column(0, "request_id", pc.add(extra.column("request_id"), top + 1))
    dc = configure(64)
    run()
    old_sets = {k[1] for k in list(dc._d) if k[0] == "thin"}
    old_units = {k[1] for k in list(dc._d) if "unit" in k}
    write_deltalake(rs.thin, extra, mode="append")
    ids = {r for batch_ids, _ in run() for r in batch_ids}
    assert {r for batch_ids, _ in cold for r in batch_ids} < ids
    assert sum(r > top for r in ids) == 3
    kept_sets = {k[1] for k in list(dc._d) if k[0] == "thin"}
    changed = {fs for fs in old_sets if any(f"bucket={b0}/" in p for p in fs)}
    assert changed and not changed & kept_sets, "the bucket's old file set is no longer kept"
    kept_units = {k[1] for k in list(dc._d) if "unit" in k}
    assert changed & old_units and not changed & kept_units, \
        "nor are units prepared from its rows"
    assert any(f"bucket={b0}/" in p for fs in kept_sets for p in fs)


def test_buffer_pool_keeps_at_most_its_budget() -> None:
    n = MIN_BYTES // 8
    pool = BufferPool(max_bytes=3 * MIN_BYTES)  # room for two buffers (each 1.25x the ask)
    held = [pool.empty(n, np.int64) for _ in range(4)]
    assert pool.allocated == 2 and pool.nbytes <= 3 * MIN_BYTES
    del held
    again = [pool.empty(n, np.int64) for _ in range(2)]
    assert pool.reused == 2 and pool.allocated == 2
    del again
    big = pool.empty(2 * n, np.int64)  # evicts free buffers to make room
    assert pool.allocated == 3 and pool.nbytes <= 3 * MIN_BYTES and big.shape == (2 * n,)


def test_shared_pool_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmat_platform.reader.buffers as buffers

    monkeypatch.setattr(buffers, "_SHARED", None)
    monkeypatch.setenv("LMAT_BATCH_POOL_MB", "-3")
    with pytest.raises(ValueError, match="LMAT_BATCH_POOL_MB must be >= 0, but got '-3'"):
        buffers.shared_pool()
    monkeypatch.setenv("LMAT_BATCH_POOL_MB", "0")
    off = buffers.shared_pool()
    a = off.empty(MIN_BYTES, np.uint8)
    assert off.allocated == 0 and a.nbytes == MIN_BYTES
    assert buffers.shared_pool() is off
    monkeypatch.setattr(buffers, "_SHARED", None)


def test_spans_sorted_and_block_sorted_tails_match_numpy() -> None:
    """Per-span order checks, and each request's run of its block in (ts, id) order, against
    a plain numpy reference on random blocks with ties and late events."""
    import numpy as np

    from lmat_platform.kernels import block_sorted_tails, spans_sorted

    rng = np.random.default_rng(11)
    sizes = rng.integers(0, 12, size=30)
    b_lo = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    b_hi = (b_lo + sizes).astype(np.int64)
    n = int(sizes.sum())
    ts = rng.integers(0, 6, size=n).astype(np.int64)  # ties on ts; ids break them
    ids = rng.permutation(n).astype(np.int64)
    r_blk, r_lo, r_hi = [], [], []
    for blk, (lo, hi) in enumerate(zip(b_lo, b_hi, strict=True)):
        for _ in range(int(rng.integers(0, 4))):
            a = int(rng.integers(lo, hi + 1))
            r_blk.append(blk)
            r_lo.append(a)
            r_hi.append(int(rng.integers(a, hi + 1)))
    r_blk_a, r_lo_a, r_hi_a = (np.array(x, dtype=np.int64) for x in (r_blk, r_lo, r_hi))
    idx, start = block_sorted_tails(ts, ids, b_lo, b_hi, r_blk_a, r_lo_a, r_hi_a)
    for j in range(len(r_blk)):
        pos = np.arange(r_lo[j], r_hi[j])
        want = pos[np.lexsort((ids[pos], ts[pos]))]
        got = idx[start[j]:start[j] + len(pos)]
        assert got.tolist() == want.tolist()
    ok = spans_sorted(r_lo_a, r_hi_a, ts, ids)
    for j in range(len(r_blk)):
        pos = np.arange(r_lo[j], r_hi[j])
        key = list(zip(ts[pos].tolist(), ids[pos].tolist(), strict=True))
        assert bool(ok[j]) == (key == sorted(key))
    with pytest.raises(ValueError, match="outside its block"):
        block_sorted_tails(ts, ids, b_lo, b_hi, np.array([0]), np.array([0]),
                           np.array([int(b_hi[0]) + 1]))
    # With a limit each request keeps only its last `limit` events in (ts, id) order.
    for limit in (0, 1, 3):
        idx, start = block_sorted_tails(ts, ids, b_lo, b_hi, r_blk_a, r_lo_a, r_hi_a, limit)
        for j in range(len(r_blk)):
            pos = np.arange(r_lo[j], r_hi[j])
            want = pos[np.lexsort((ids[pos], ts[pos]))][len(pos) - min(len(pos), limit):]
            assert idx[start[j]:start[j] + len(want)].tolist() == want.tolist()
    # A user's requests (a few first events, growing ends) over events mostly in order with
    # some late ones: a request extends the copy of the one before while its new events sort
    # after it, so the copies hold fewer events than the requests; still each one's exact.
    ts2 = np.cumsum(rng.integers(0, 3, size=400)).astype(np.int64)
    late = rng.choice(400, size=12, replace=False)
    ts2[late] -= rng.integers(1, 60, size=12)
    ids2 = rng.permutation(400).astype(np.int64)
    b_lo2, b_hi2 = np.array([0, 150], dtype=np.int64), np.array([150, 400], dtype=np.int64)
    rq = [(blk, a, e) for blk, starts in ((0, (0, 0, 0, 40)), (1, (150, 170, 170)))
          for a in starts for e in np.sort(rng.integers(a, b_hi2[blk] + 1, size=25)).tolist()]
    r_blk2, r_lo2, r_hi2 = (np.array(x, dtype=np.int64) for x in zip(*rq, strict=True))
    for limit in (None, 5, 60):
        idx, start = block_sorted_tails(ts2, ids2, b_lo2, b_hi2, r_blk2, r_lo2, r_hi2, limit)
        kept = 0
        for j, (_, a, e) in enumerate(rq):
            pos = np.arange(a, e)
            want = pos[np.lexsort((ids2[pos], ts2[pos]))]
            want = want[len(pos) - min(len(pos), limit or len(pos)):]
            kept += len(want)
            assert idx[start[j]:start[j] + len(want)].tolist() == want.tolist(), (limit, j)
        if limit != 5:  # (with 5, ends grow by more than the 5 events a copy keeps)
            assert len(idx) - 400 < kept / 2, (limit, len(idx), kept)
    # The same requests' order checks (a request whose span starts where the one before's
    # did and ends later is checked past that one's end only): each as a whole scan says.
    ok2 = spans_sorted(r_lo2, r_hi2, ts2, ids2)
    for j, (_, a, e) in enumerate(rq):
        key = list(zip(ts2[a:e].tolist(), ids2[a:e].tolist(), strict=True))
        assert bool(ok2[j]) == (key == sorted(key)), j
    assert ok2.any() and not ok2.all()


def test_tail_runs_store_each_users_events_once() -> None:
    """Requests grouped by user in request order, each with a run of its user's events (both
    ends non-decreasing, as snapshot watermark and request time are): every request finds its
    run at its offset among its user's stored events, in its user's first row; touching or
    overlapping runs are stored once, a gap is not stored."""
    import numpy as np

    from lmat_platform.kernels import tail_runs

    rng = np.random.default_rng(5)
    n = 200
    users = np.sort(rng.integers(0, 12, n)).astype(np.int64)
    rids = rng.permutation(10 * n)[:n].astype(np.int64)
    lo = np.sort(rng.integers(0, 40, n)).astype(np.int64)
    lo = lo[np.lexsort((lo, users))]
    hi = lo + rng.integers(0, 12, n)
    for u in np.unique(users):  # a later request's tail ends no earlier
        m = users == u
        hi[m] = np.maximum.accumulate(hi[m])
    empty = rng.random(n) < 0.1
    hi[empty] = lo[empty]  # some requests without a tail
    block, start, stored, run_a, run_b = tail_runs(users, rids, lo, hi)
    ends = np.cumsum(stored)
    pos = np.concatenate([np.arange(a, b) for a, b in zip(run_a, run_b, strict=True)])
    assert len(pos) == int(ends[-1])
    for i in range(n):
        f = int(np.flatnonzero(users == users[i])[0])
        assert block[i] == rids[f] and (stored[i] == 0 or i == f)
        k = max(int(hi[i] - lo[i]), 0)
        user_pos = pos[ends[f] - stored[f]:ends[f]]
        assert user_pos[start[i]:start[i] + k].tolist() == list(range(lo[i], lo[i] + k))
        # Stored once: a user's stored events are distinct.
        assert len(set(user_pos.tolist())) == len(user_pos)
    # Touching runs merge into one; a gap between runs is not stored.
    one = np.array([1, 1, 1]), np.array([7, 8, 9])
    _, st, sd, ra, rb = tail_runs(*one, np.array([0, 2, 6]), np.array([2, 4, 8]))
    assert ra.tolist() == [0, 6] and rb.tolist() == [4, 8]
    assert st.tolist() == [0, 2, 4] and sd.tolist() == [6, 0, 0]
    with pytest.raises(ValueError, match="lengths differ"):
        tail_runs(users, rids[:-1], lo, hi)


def test_kernels_warm_up_in_background_without_the_blas_probe() -> None:
    """A fresh process that imports the loader starts the kernels' warm-up in a thread;
    warm_up() waits for it; numba's BLAS probe (an import of scipy.linalg) was skipped; a
    fork made meanwhile waits for the warm-up, and the child runs kernels (no compiler lock
    inherited held)."""
    import subprocess
    import sys

    code = """
import os, sys
import numpy as np
import lmat_platform.reader.loader
from lmat_platform import kernels
assert kernels._WARMING is not None, "no warm-up started at import"
pid = os.fork()
if pid == 0:
    z = np.zeros(3, dtype=np.int64)
    os._exit(0 if kernels.is_sorted3(z, z, z) else 3)
_, status = os.waitpid(pid, 0)
assert os.WEXITSTATUS(status) == 0, status
kernels.warm_up()
assert kernels._WARM and not kernels._WARMING.is_alive()
import numba.np.arraymath as am
assert am._HAVE_BLAS is False and "scipy.linalg" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "LMAT_NUMBA_BLAS_PROBE": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_blas_probe_skip_waits_for_numbas_compiler_lock() -> None:
    """The BLAS probe is answered under numba's compiler lock, as numba loads its registries:
    another thread's compile (which holds that lock, and calls numba.np.linalg.ensure_blas
    when typing np.dot or np.linalg) never sees the stand-in, and the real one is back
    afterwards."""
    import os
    import subprocess
    import sys

    code = """
import sys, threading
import numba.np.linalg as nl
from numba.core.compiler_lock import global_compiler_lock
from lmat_platform import kernels
assert "numba.np.arraymath" not in sys.modules
real = nl.ensure_blas
t = threading.Thread(target=kernels._skip_blas_probe)
with global_compiler_lock:  # another thread's compile in progress
    t.start()
    t.join(timeout=3)
    assert t.is_alive(), "the probe was swapped during another thread's compile"
    assert nl.ensure_blas is real
t.join()
import numba.np.arraymath as am
assert nl.ensure_blas is real and am._HAVE_BLAS is False and "scipy.linalg" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "LMAT_NUMBA_BLAS_PROBE": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_merge_sorted_runs_matches_a_sort() -> None:
    """Sorted runs (a bucket's stripes and generation files) merged in one pass equal a stable
    lexicographic sort of them all; a run out of order gives None (the caller sorts)."""
    import numpy as np

    from lmat_platform.kernels import merge_sorted_runs

    rng = np.random.default_rng(4)
    runs = []
    for n in (0, 50, 1, 300, 17):
        k = np.stack([rng.integers(0, 8, n), rng.integers(0, 20, n), rng.integers(0, 5, n)])
        runs.append(k[:, np.lexsort(k[::-1])])
    a, b, c = np.concatenate(runs, axis=1)
    bounds = np.cumsum([0, *(r.shape[1] for r in runs)])
    order = merge_sorted_runs(a, b, c, bounds)
    assert order is not None
    assert order.tolist() == np.lexsort((c, b, a)).tolist()  # stable: earlier run first on ties
    a2 = a.copy()
    a2[bounds[3]] = 100  # the 300-row run's first row now sorts after its second
    assert merge_sorted_runs(a2, b, c, bounds) is None
    with pytest.raises(ValueError, match="do not cut"):
        merge_sorted_runs(a, b, c, bounds[:-1])
