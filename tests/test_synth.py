"""Tests of the synthetic workload generator (lmat_platform.synth)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lmat_platform import synth
from lmat_platform.synth import (
    EVENT_SCHEMA,
    REQUEST_SCHEMA,
    WorkloadConfig,
    day_bounds,
    generate_day_events,
    generate_day_events_with_stats,
    generate_day_requests,
    write_workload,
)

CFG = WorkloadConfig()

REQUIRED = ["user_id", "event_id", "event_ts", "arrival_ts", "item_id", "action"]


@pytest.fixture(scope="module")
def days() -> list[tuple[pa.Table, synth.DayStats]]:
    return [generate_day_events_with_stats(CFG, d) for d in range(CFG.days)]


def _valid(t: pa.Table) -> np.ndarray:
    """Mask of rows that ingest would not quarantine as malformed."""
    ok = np.ones(t.num_rows, dtype=bool)
    for c in REQUIRED:
        ok &= t[c].is_valid().to_numpy(zero_copy_only=False)
    ev = t["event_ts"].fill_null(0).to_numpy()
    ar = t["arrival_ts"].fill_null(0).to_numpy()
    return ok & (ev <= ar)


def test_deterministic_and_order_independent() -> None:
    a = generate_day_events(CFG, 2)
    generate_day_events(CFG, 0)
    assert generate_day_events(CFG, 2).equals(a)
    assert generate_day_requests(CFG, 1).equals(generate_day_requests(CFG, 1))
    other = WorkloadConfig(seed=1)
    assert not generate_day_events(other, 2).equals(a)
    assert not generate_day_requests(other, 1).equals(generate_day_requests(CFG, 1))


def test_schemas_exact(days: list[tuple[pa.Table, synth.DayStats]]) -> None:
    for t, _ in days:
        assert t.schema.equals(EVENT_SCHEMA)
        assert t.num_rows == CFG.events_per_day
    r = generate_day_requests(CFG, 0)
    assert r.schema.equals(REQUEST_SCHEMA)
    assert r.num_rows == CFG.requests_per_day
    assert r.column("request_id").null_count == 0


def test_event_ids_unique_apart_from_duplicates(
    days: list[tuple[pa.Table, synth.DayStats]],
) -> None:
    ids = pa.concat_arrays([t["event_id"].combine_chunks() for t, _ in days]).drop_null()
    n_dup = sum(s.duplicates for _, s in days)
    assert len(ids) - len(pc.unique(ids)) == n_dup
    assert n_dup > 0
    # Re-sent rows repeat an id of the previous day's file, copied in full but for arrival_ts.
    prev_ids = set(days[0][0]["event_id"].drop_null().to_pylist())
    today = days[1][0]
    resent = [i for i in today["event_id"].drop_null().to_pylist() if i in prev_ids]
    assert len(resent) == days[1][1].resent > 0


def test_shares_roughly_as_configured(days: list[tuple[pa.Table, synth.DayStats]]) -> None:
    for d, (t, s) in enumerate(days):
        n = t.num_rows
        valid = _valid(t)
        assert (~valid).sum() == s.malformed
        assert s.malformed == pytest.approx(CFG.malformed_share * n, abs=2)
        assert s.duplicates == pytest.approx(CFG.dup_share * n, abs=3)
        assert s.late == pytest.approx(CFG.late_share * n, rel=0.2)
        start, end = day_bounds(CFG, d)
        ar = t["arrival_ts"].to_numpy(zero_copy_only=False)
        in_day = valid & (ar >= start) & (ar < end)
        before = valid & (ar < start)
        assert before.sum() == s.stragglers
        assert in_day.sum() + before.sum() == valid.sum()
        if d == 0:
            assert s.stragglers == 0
        else:
            assert s.stragglers == pytest.approx(CFG.straggler_share * n, abs=2)
            assert (ar[before] >= start - synth.MICROS_PER_DAY).all()
        # Late events: arrival long after the event happened (but at most 2 days).
        delay = ar[valid] - t["event_ts"].to_numpy(zero_copy_only=False)[valid]
        assert (delay >= 0).all()
        # Re-sent rows (ids of an earlier day) may be older; every other row is at most 2 days.
        own = t["event_id"].to_numpy(zero_copy_only=False)[valid] >= d * synth.ID_STRIDE
        assert (delay[own] <= 2 * synth.MICROS_PER_DAY).all()
        assert (delay > 600 * 1_000_000).sum() >= s.late
        assert np.median(delay) < 5_000_000


def test_malformed_rows_have_nulls_and_inverted_times(
    days: list[tuple[pa.Table, synth.DayStats]],
) -> None:
    t = pa.concat_tables([t for t, _ in days])
    nulls = sum(t[c].null_count for c in REQUIRED)
    ev = t["event_ts"].fill_null(0).to_numpy()
    ar = t["arrival_ts"].fill_null(2**62).to_numpy()
    assert nulls > 0
    assert (ev > ar).sum() > 0


def test_zipf_skew_and_heavy_tail(days: list[tuple[pa.Table, synth.DayStats]]) -> None:
    users = pa.concat_arrays([t["user_id"].combine_chunks() for t, _ in days]).drop_null()
    counts = np.sort(np.array(list(Counter(users.to_pylist()).values())))[::-1]
    top = counts[: max(1, CFG.n_users // 10)].sum()
    assert top / counts.sum() > 0.4
    assert counts[0] > 1000  # a long-history user even at the default scale
    items = Counter(
        pa.concat_arrays([t["item_id"].combine_chunks() for t, _ in days]).drop_null().to_pylist()
    )
    assert items.most_common(1)[0][1] > 20 * len(users) / CFG.n_items
    actions = Counter(days[0][0]["action"].drop_null().to_pylist())
    assert actions.most_common(1)[0][0] == 1
    assert set(actions) <= set(CFG.actions)


def test_requests(days: list[tuple[pa.Table, synth.DayStats]]) -> None:
    reqs = [generate_day_requests(CFG, d) for d in range(CFG.days)]
    ids = pa.concat_arrays([r["request_id"].combine_chunks() for r in reqs])
    assert len(pc.unique(ids)) == len(ids)
    known = set(
        pa.concat_arrays([t["user_id"].combine_chunks() for t, _ in days]).drop_null().to_pylist()
    )
    for d, r in enumerate(reqs):
        start, end = day_bounds(CFG, d)
        ts = r["request_ts"].to_numpy()
        assert ((ts >= start) & (ts < end)).all()
        assert (np.diff(ts) >= 0).all()
        users = r["user_id"].to_pylist()
        new = [u for u in users if u not in known]
        assert 0 < len(new) < 0.1 * len(users)
        # Some requests sit exactly at an arrival_ts of one of the user's events.
        t = days[d][0]
        arrivals = set(zip(t["user_id"].to_pylist(), t["arrival_ts"].to_pylist(), strict=True))
        exact = sum((u, x) in arrivals for u, x in zip(users, ts.tolist(), strict=True))
        assert exact > 0
        assert set(r["label"].to_pylist()) == {0, 1}
    # Bursty: most consecutive requests of a user are minutes apart, not hours.
    r = reqs[0].sort_by([("user_id", "ascending"), ("request_ts", "ascending")])
    u = r["user_id"].to_numpy()
    gaps = np.diff(r["request_ts"].to_numpy())[np.diff(u) == 0]
    assert np.median(gaps) < 300 * 1_000_000


def test_write_workload(tmp_path: Path) -> None:
    cfg = WorkloadConfig(days=2, events_per_day=300, requests_per_day=50, seed=7)
    seen: list[str] = []
    wl = write_workload(cfg, tmp_path / "wl", progress=seen.append)
    assert [p.name for p in wl.event_files] == ["day-000.parquet", "day-001.parquet"]
    assert [p.parent.name for p in wl.request_files] == ["requests", "requests"]
    assert wl.n_events == 600 and wl.n_requests == 100
    assert len(seen) == 2
    back = pq.read_table(wl.event_files[1])
    assert back.schema.equals(EVENT_SCHEMA)
    assert back.equals(generate_day_events(cfg, 1))
    assert pq.read_table(wl.request_files[0]).equals(generate_day_requests(cfg, 0))


def test_multi_chunk_day(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the chunk so a small day spans several chunks; ids stay unique and ordered in time.
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1000)
    cfg = WorkloadConfig(events_per_day=3500, days=2)
    t, s = generate_day_events_with_stats(cfg, 1)
    assert t.num_rows == 3500
    ids = t["event_id"].drop_null()
    assert len(ids) - len(pc.unique(ids)) == s.duplicates - s.resent
    start, end = day_bounds(cfg, 1)
    ar = t["arrival_ts"].to_numpy(zero_copy_only=False)[_valid(t)]
    assert ((ar >= start - synth.MICROS_PER_DAY) & (ar < end)).all()


def test_tiny_and_empty_configs() -> None:
    t = generate_day_events(WorkloadConfig(events_per_day=0), 0)
    assert t.num_rows == 0 and t.schema.equals(EVENT_SCHEMA)
    r = generate_day_requests(WorkloadConfig(events_per_day=0, requests_per_day=3), 0)
    assert r.num_rows == 3
    with pytest.raises(ValueError):
        WorkloadConfig(dup_share=2.0)
