"""Parity (spec sections 4-7): for generated small stores, the streaming path, the batch path, the
fat-row baseline, the library's naive reference and this file's own plain-Python statement of
H(u, T) agree element for element, for several tenants.

The generated stores have late arrivals, equal timestamps, events arriving exactly at a
watermark and exactly at a request time, snapshots published exactly at a request time, users
without history, forgotten users, rows quarantined behind the watermark, a trait column that only
appears in later files, compaction at various points, and a heavy user whose history crosses the
head-length markers (64, 128) that the reader uses to skip old row groups.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lmat_platform.fatrows import write_fat_rows
from lmat_platform.protocol.thin import write_thin
from lmat_platform.reader import Batch, SequenceLoader
from lmat_platform.reconstruct import materialize
from lmat_platform.store import (
    compact_buckets,
    forget_users,
    ingest_files,
    init_store,
    publish_snapshot,
)
from lmat_platform.tenants import Tenant
from lmat_platform.validate import check_leakage, reference_sequences
from tests.helpers import (
    HOUR_US,
    assert_matches,
    expected_outputs,
    read,
    requests_table,
    write_events,
)

U = HOUR_US
HEAVY = 99


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    n_users = draw(st.integers(1, 4))
    n_snap = draw(st.integers(0, 3))
    ws = sorted(draw(st.sets(st.integers(2, 40), min_size=n_snap, max_size=n_snap)))
    snaps, p_prev = [], 0
    for w in ws:
        p = max(p_prev, w + draw(st.sampled_from([0, 0, 1, 3])))
        snaps.append((w * U, p * U))
        p_prev = p
    events = []
    n_ev = draw(st.integers(1, 50))
    for _ in range(n_ev):
        ets = draw(st.integers(0, 40))
        delay = draw(st.sampled_from([0, 0, 1, 2, 6, 20]))  # some arrive very late
        events.append(
            {
                "user_id": draw(st.integers(1, n_users)),
                "event_ts": ets * U,
                "arrival_ts": (ets + delay) * U,
                "item_id": draw(st.integers(0, 9)),
                "action": draw(st.integers(1, 3)),
                "dwell_ms": draw(st.sampled_from([None, 0.25, 1.5, 7.0])),
            }
        )
    # Some events arrive exactly at a watermark.
    for w, _ in snaps:
        for i in draw(st.lists(st.integers(0, n_ev - 1), max_size=2)):
            events[i]["arrival_ts"] = w
            events[i]["event_ts"] = min(events[i]["event_ts"], w)
    if draw(st.booleans()):
        # A heavy user: histories longer than the 64 and 128 head-length markers, with ties.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        n = int(rng.integers(70, 160))
        ets = rng.integers(0, 40, n)
        arr = ets + rng.choice([0, 0, 1, 5, 20], n)
        for e, a in zip(ets.tolist(), arr.tolist(), strict=True):
            events.append(
                {
                    "user_id": HEAVY,
                    "event_ts": e * U,
                    "arrival_ts": a * U,
                    "item_id": int(rng.integers(0, 9)),
                    "action": int(rng.integers(1, 4)),
                    "dwell_ms": float(rng.integers(0, 8)) / 2,
                }
            )
    # Event ids in an order unrelated to time, so (event_ts, event_id) ties are broken by id.
    ids = draw(st.permutations(range(len(events))))
    for e, i in zip(events, ids, strict=True):
        e["event_id"] = 1000 + i
    users = sorted({e["user_id"] for e in events})
    times = sorted({e["arrival_ts"] for e in events} | {x for s in snaps for x in s})
    n_req = draw(st.integers(1, 14))
    requests = []
    for r in range(n_req):
        T = draw(st.one_of(st.integers(0, 62).map(lambda k: k * U), st.sampled_from(times)))
        # Users 0 and n_users + 1 never have events.
        u = draw(st.sampled_from([0, n_users + 1, *users]))
        requests.append({"request_id": 500 + r, "user_id": u, "request_ts": T, "label": r % 2})
    return {
        "events": events,
        "snaps": snaps,
        "requests": requests,
        "forget": draw(st.lists(st.sampled_from(users), max_size=2, unique=True)),
        "trait_late": n_snap > 0 and draw(st.booleans()),
        "late_rows": n_snap > 0 and draw(st.booleans()),
        "compact": draw(st.sampled_from(["none", "mid", "end"])),
        "small_len": draw(st.sampled_from([1, 2, 3])),
        "mid_len": draw(st.sampled_from([5, 64, 65, 100])),
        "window_days": draw(st.sampled_from([0.25, 0.5])),
    }


def build(root: Path, sc: dict) -> tuple[str, str, str, list[dict]]:
    """Run the scenario like production: ingest by arrival, publish, log requests as they come.

    Returns the store path, the two thin tables and the events that must count as accepted.
    """
    store = init_store(str(root / "store"), n_buckets=2, row_group_rows=64)
    thin_log, thin_batch = str(root / "thin-log"), str(root / "thin-batch")
    pending = sorted(sc["events"], key=lambda e: (e["arrival_ts"], e["event_id"]))
    expected = []
    logged: set[int] = set()
    n_files = 0

    def ingest(batch: list[dict], phase: int) -> None:
        nonlocal n_files
        if not batch:
            return
        traits = [] if sc["trait_late"] and phase == 0 else ["dwell_ms"]
        for half in (batch[: len(batch) // 2], batch[len(batch) // 2 :]):
            if half:
                n_files += 1
                p = write_events(root / f"e{n_files}.parquet", half, traits=traits)
                res = ingest_files(store, [p])
                assert res.accepted == len(half), res.as_dict()
        expected.extend({**e, "dwell_ms": e["dwell_ms"] if traits else None} for e in batch)

    def log_until(limit: int | None) -> None:
        todo = [
            r
            for r in sc["requests"]
            if r["request_id"] not in logged and (limit is None or r["request_ts"] <= limit)
        ]
        if not todo:
            return
        n = len(logged)
        p = root / f"req-log-{n}.parquet"
        pq.write_table(requests_table(todo, label=pa.int8()), p)
        write_thin(store, str(p), thin_log, path="log")
        logged.update(r["request_id"] for r in todo)

    for k, (w, p) in enumerate(sc["snaps"]):
        batch = [e for e in pending if e["arrival_ts"] < w]
        pending = pending[len(batch) :]
        ingest(batch, k)
        if sc["compact"] == "mid" and k == 1:
            compact_buckets(store)
        publish_snapshot(store, w, published_at=p)
        # Serving logs each request at its time T: by then every event with arrival < T is
        # ingested and every snapshot with P <= T is published (P_j >= W_j > W_k >= T, j > k).
        log_until(w)
    if sc["trait_late"] and not pending:
        pending = [
            {
                "user_id": 1,
                "event_id": 10_000,
                "event_ts": 60 * U,
                "arrival_ts": 61 * U,
                "item_id": 1,
                "action": 1,
                "dwell_ms": 1.0,
            }
        ]
    ingest(pending, len(sc["snaps"]))
    if sc["late_rows"]:
        w_last = sc["snaps"][-1][0]
        late = [
            {
                "user_id": 1,
                "event_id": 20_000 + i,
                "event_ts": 0,
                "arrival_ts": w_last - 1 - i,
                "item_id": 5,
                "action": 1,
                "dwell_ms": 1.0,
            }
            for i in range(2)
        ]
        res = ingest_files(store, [write_events(root / "late.parquet", late, traits=["dwell_ms"])])
        assert res.quarantined["behind_watermark"] == 2 and res.accepted == 0
    log_until(None)
    req_all = root / "req-all.parquet"
    pq.write_table(requests_table(sc["requests"], label=pa.int8()), req_all)
    write_thin(store, str(req_all), thin_batch, path="examples")
    if sc["forget"]:
        forget_users(store, sc["forget"])
    if sc["compact"] == "end":
        compact_buckets(store)
    gone = set(sc["forget"])
    return store.root, thin_log, thin_batch, [e for e in expected if e["user_id"] not in gone]


@settings(
    max_examples=int(os.environ.get("LMAT_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sc=scenarios())
def test_all_paths_agree_with_the_naive_history(tmp_path_factory, sc: dict) -> None:
    root = tmp_path_factory.mktemp("parity")
    store, thin_log, thin_batch, accepted = build(root, sc)
    from lmat_platform.store import open_store

    st_ = open_store(store)
    raw = read(st_, "raw")
    assert sorted(raw.column("event_id").to_pylist()) == sorted(e["event_id"] for e in accepted)
    requests = requests_table(sc["requests"], label=pa.int8())
    tenants = [
        Tenant("full", ("item_id", "action", "event_ts", "event_id", "dwell_ms"), 100_000),
        Tenant("short", ("event_id", "item_id"), sc["small_len"]),
        Tenant("acts", ("event_id", "action"), sc["mid_len"], actions=(1, 2)),
        Tenant(
            "window",
            ("event_id", "event_ts", "dwell_ms"),
            sc["mid_len"],
            window_days=sc["window_days"],
        ),
        Tenant(
            "mixed",
            ("dwell_ms", "event_id"),
            sc["small_len"],
            actions=(2, 3),
            window_days=sc["window_days"],
        ),
    ]
    for t in tenants:
        want = expected_outputs(accepted, sc["requests"], t)
        outs = {}
        for name, thin in (("streaming", thin_log), ("batch", thin_batch)):
            out = str(root / f"{t.name}-{name}.parquet")
            materialize(st_, thin, t, out)
            outs[name] = pq.read_table(out)
        fat = str(root / f"{t.name}-fat.parquet")
        write_fat_rows(st_, requests, t, fat)
        outs["fat"] = pq.read_table(fat)
        outs["reference"] = reference_sequences(raw, requests, t)
        # Thin tables lose a forgotten user's requests (spec 7: their examples are their data);
        # fat rows and the reference, built from the request file, keep them, histories empty.
        kept = {r: w for r, w in want.items() if w["user_id"] not in set(sc["forget"])}
        for name, got in outs.items():
            assert_matches(got, kept if name in ("streaming", "batch") else want,
                           label=f"tenant {t.name}, {name}")
        for name, thin in (("streaming", thin_log), ("batch", thin_batch)):
            # The loader copies from a plan (shuffled windows of several units, so plans are
            # concatenated and cut by permutation): the same sequences, nulls as 0.
            loader = SequenceLoader(st_, thin, tenant=t, batch_size=7, shuffle=True, seed=1,
                                    max_unit_rows=4, shuffle_buffer=9)
            assert loader_sequences(list(loader), t.columns) == table_sequences(outs[name],
                                                                                t.columns)
        for name in ("streaming", "batch"):
            assert outs[name].schema.field("length").type == pa.int32()
            leak = check_leakage(outs[name], raw, t)
            assert leak.ok, leak.problems


def loader_sequences(batches: list[Batch], columns: tuple[str, ...]) -> dict:
    """request_id -> (column -> values) from the loader's batches."""
    out: dict = {}
    for b in batches:
        off = np.concatenate([[0], np.cumsum(b.lengths.numpy())])
        for i, r in enumerate(b.request_id.tolist()):
            out[r] = {c: _nan_safe(b.values[c][off[i]:off[i + 1]].tolist()) for c in columns}
    return out


def _nan_safe(vals: list) -> list:
    """NaN as a string, so that equal sequences compare equal."""
    return ["nan" if isinstance(v, float) and v != v else v for v in vals]


def table_sequences(table: pa.Table, columns: tuple[str, ...]) -> dict:
    """The same from a materialized table, with the loader's conversions (nulls as 0, NaN for
    floats; timestamps as int64 microseconds)."""
    import pyarrow.compute as pc

    out: dict = {}
    ids = table.column("request_id").to_pylist()
    for c in columns:
        col = table.column(c).combine_chunks()
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        vals = pc.list_flatten(col)
        if pa.types.is_timestamp(vals.type):
            vals = vals.cast(pa.int64())
        fill = float("nan") if pa.types.is_floating(vals.type) else 0
        vals = _nan_safe(pc.fill_null(vals, pa.scalar(fill, vals.type)).to_pylist())
        off = np.concatenate([[0], np.cumsum(lens)])
        for i, r in enumerate(ids):
            out.setdefault(r, {})[c] = vals[off[i]:off[i + 1]]
    return out
