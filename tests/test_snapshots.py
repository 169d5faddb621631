"""Snapshots (spec section 3): watermarks, content, immutability, and the tier's commit history."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from lmat_platform import synth
from lmat_platform.exceptions import WatermarkError
from lmat_platform.store import (
    compact_buckets,
    forget_users,
    ingest_files,
    init_store,
    list_snapshots,
    publish_snapshot,
)
from lmat_platform.validate import check_uih_commits, delta_log_entries, read_commits
from tests.conftest import SynthStore
from tests.helpers import read, run_lmat, table_versions, tier_rows, tree, write_events

TIER_COLS = (
    "user_id",
    "event_id",
    "event_ts",
    "arrival_ts",
    "item_id",
    "action",
    "dwell_ms",
    "surface",
)


def _ev(eid: int, arr: int, user: int = 1) -> dict[str, int]:
    return {
        "user_id": user,
        "event_id": eid,
        "event_ts": arr - 1,
        "arrival_ts": arr,
        "item_id": eid,
        "action": 1,
    }


def test_watermarks_strictly_increase_and_publish_time_is_not_before_them(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ingest_files(store, [write_events(tmp_path / "a.parquet", [_ev(1, 10), _ev(2, 20)])])
    with pytest.raises(WatermarkError, match="--published-at"):
        publish_snapshot(store, 15, published_at=14)
    assert list_snapshots(store) == []
    s0 = publish_snapshot(store, 15)
    assert (s0.snapshot_id, s0.watermark, s0.published_at, s0.events) == (0, 15, 15, 1)
    before, files = table_versions(store), tree(store.root)
    for w, p in ((15, None), (14, None), (15, 30), (16, 15)):
        with pytest.raises(WatermarkError) as ei:
            publish_snapshot(store, w, published_at=p)
        assert "\n" not in str(ei.value)
    with pytest.raises(WatermarkError, match="does not increase"):
        publish_snapshot(store, 15)
    assert table_versions(store) == before and tree(store.root) == files
    s1 = publish_snapshot(store, 16, published_at=16)  # no new events: an empty snapshot
    assert (s1.snapshot_id, s1.events) == (1, 0)
    s2 = publish_snapshot(store, 30, published_at=40)
    assert (s2.snapshot_id, s2.events) == (2, 1)
    snaps = list_snapshots(store)
    assert [s.watermark for s in snaps] == [15, 16, 30]
    assert all(s.published_at >= s.watermark for s in snaps)
    assert [s.published_at for s in snaps] == sorted(s.published_at for s in snaps)


def test_snapshot_k_holds_exactly_the_accepted_events_arrived_before_its_watermark(
    synth_store_ro: SynthStore,
) -> None:
    store = synth_store_ro.store
    raw = read(store, "raw")
    snaps = list_snapshots(store)
    assert len(snaps) == synth_store_ro.cfg.days
    assert read(store, "quarantine").num_rows > 0  # the workload has late stragglers etc.
    for s in snaps:
        arrived = raw.filter(pa.array(raw.column("arrival_ts").to_numpy() < s.watermark))
        want = sorted(arrived.select(list(TIER_COLS)).to_pylist(), key=lambda r: r["event_id"])
        got = [{c: r[c] for c in TIER_COLS} for r in tier_rows(store, max_snapshot=s.snapshot_id)]
        assert got == want
        assert len(got) > 0
        assert s.published_at >= s.watermark
    # Every row of snapshot k (and not of k-1) arrived in [W_{k-1}, W_k).
    prev = None
    for s in snaps:
        for r in tier_rows(store):
            if r["snapshot_id"] == s.snapshot_id:
                assert r["arrival_ts"] < s.watermark
                assert prev is None or r["arrival_ts"] >= prev
        prev = s.watermark


def _snapshot_contents(store) -> dict[int, list[dict]]:
    return {
        s.snapshot_id: tier_rows(store, max_snapshot=s.snapshot_id) for s in list_snapshots(store)
    }


def test_published_snapshots_never_change(synth_store: SynthStore, tmp_path: Path) -> None:
    store = synth_store.store
    before = _snapshot_contents(store)
    heads_before = read(store, "heads").to_pylist()
    # Time travel to the tier version recorded at publish shows the same content.
    for s in list_snapshots(store):
        assert (
            tier_rows(store, max_snapshot=s.snapshot_id, version=s.uih_version)
            == before[s.snapshot_id]
        )
    cfg = dataclasses.replace(synth_store.cfg, days=5)
    for day in (3, 4):
        p = tmp_path / f"day-{day}.parquet"
        pq.write_table(synth.generate_day_events(cfg, day), p)
        res = ingest_files(store, [str(p)])
        assert res.accepted > 0
        # Late stragglers of the day before are behind the watermark: quarantined, not added.
        assert res.quarantined["behind_watermark"] > 0
        compact_buckets(store)
        _, end = synth.day_bounds(cfg, day)
        publish_snapshot(store, end, published_at=end)
        for k, rows in before.items():
            assert tier_rows(store, max_snapshot=k) == rows, f"snapshot {k} changed"
    # Heads of old snapshots are untouched too (new snapshots only add entries).
    heads_now = read(store, "heads").to_pylist()
    key = lambda r: (r["user_id"], r["snapshot_id"])  # noqa: E731
    old = {key(r): r for r in heads_now if r["snapshot_id"] < len(before)}
    assert old == {key(r): r for r in heads_before}
    rep = check_uih_commits(read_commits(delta_log_entries(store.table_uri("uih"))))
    assert rep.ok, rep.problems


def test_immutability_validator_passes_on_real_history(synth_store: SynthStore) -> None:
    store = synth_store.store
    compact_buckets(store)
    forget_users(store, [int(read(store, "raw").column("user_id")[0].as_py())])
    commits = read_commits(delta_log_entries(store.table_uri("uih")))
    ops = [c["commitInfo"].get("lmat.op") for c in commits]
    assert {"publish", "compact", "forget"} <= set(ops)
    rep = check_uih_commits(commits)
    assert rep.ok, rep.problems
    assert rep.checked == len(commits)
    r = run_lmat("validate", store.root)
    assert r.returncode == 0, r.stderr


def test_immutability_validator_fails_on_an_untagged_delete_in_the_real_log(
    synth_store: SynthStore,
) -> None:
    store = synth_store.store
    user = int(read(store, "raw").column("user_id")[0].as_py())
    # Someone rewrites the tier behind lmat's back: a plain Delta delete, not a forget.
    DeltaTable(store.table_uri("uih")).delete(f"user_id = {user}")
    rep = check_uih_commits(read_commits(delta_log_entries(store.table_uri("uih"))))
    assert not rep.ok
    assert rep.counts.get("rewrite") == 1
    r = run_lmat("validate", store.root)
    assert r.returncode != 0
    assert "dataChange=true" in r.stderr and "Traceback" not in r.stderr
