"""Ingest (spec section 2): quarantine reasons, duplicates, idempotency, schema evolution,
crash safety (SIGKILL part way) and concurrent writers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmat_platform.exceptions import SchemaError
from lmat_platform.store import ingest_files, init_store, publish_snapshot
from lmat_platform.store.ingest import REASON_NULL, REASON_TS, REASON_WATERMARK
from tests.helpers import (
    REPO,
    REQUIRED,
    events_table,
    read,
    table_versions,
    tier_rows,
    tree,
    write_events,
)


def ev(
    eid: int,
    *,
    user: int = 1,
    ts: int = 10,
    arr: int = 20,
    item: int = 7,
    action: int = 1,
    **extra: object,
) -> dict[str, object]:
    return {
        "user_id": user,
        "event_id": eid,
        "event_ts": ts,
        "arrival_ts": arr,
        "item_id": item,
        "action": action,
        **extra,
    }


def quarantine_by_row(store) -> dict[int, str]:
    q = read(store, "quarantine")
    return {r["row_no"]: r["reason"] for r in q.to_pylist()}


# ----------------------------------------------------------------------------- quarantine


def test_quarantine_reasons_are_exact(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    rows = [ev(100, row_no=0), ev(101, ts=20, arr=20, row_no=1)]  # event_ts == arrival_ts: ok
    # One null required column at a time, each otherwise valid.
    for i, c in enumerate(REQUIRED):
        rows.append({**ev(200 + i), c: None, "row_no": 10 + i})
    rows.append(ev(300, ts=21, arr=20, row_no=20))  # event_ts > arrival_ts
    rows.append({**ev(301, ts=50, arr=20), "item_id": None, "row_no": 21})  # both: null first
    res = ingest_files(store, [write_events(tmp_path / "a.parquet", rows, traits=["row_no"])])

    want = {10 + i: REASON_NULL for i in range(len(REQUIRED))} | {20: REASON_TS, 21: REASON_NULL}
    assert quarantine_by_row(store) == want
    assert res.accepted == 2 and res.duplicates == 0
    assert res.quarantined == {REASON_NULL: 7, REASON_TS: 1, REASON_WATERMARK: 0}
    assert sorted(read(store, "raw").column("event_id").to_pylist()) == [100, 101]
    q = read(store, "quarantine")
    assert set(q.column("source").to_pylist()) == {"a.parquet"}

    # behind_watermark: arrival strictly below the newest watermark; arrival == W is accepted.
    publish_snapshot(store, 30)
    publish_snapshot(store, 40, published_at=45)
    rows = [
        ev(400, arr=39, row_no=30),
        ev(401, arr=40, row_no=31),
        ev(402, arr=5, ts=1, row_no=32),
        ev(403, ts=41, arr=40, row_no=33),  # also event_ts > arrival_ts: that reason wins
        ev(100, arr=10, row_no=34),
    ]  # a duplicate id behind the watermark: quarantined
    res = ingest_files(store, [write_events(tmp_path / "b.parquet", rows, traits=["row_no"])])
    assert res.accepted == 1 and res.duplicates == 0
    assert res.quarantined == {REASON_NULL: 0, REASON_TS: 1, REASON_WATERMARK: 3}
    q = quarantine_by_row(store)
    assert {k: q[k] for k in (30, 32, 33, 34)} == {
        30: REASON_WATERMARK,
        32: REASON_WATERMARK,
        33: REASON_TS,
        34: REASON_WATERMARK,
    }
    assert 31 not in q
    assert sorted(read(store, "raw").column("event_id").to_pylist()) == [100, 101, 401]
    # Quarantined rows never reach the tier, whatever later snapshots do.
    publish_snapshot(store, 100)
    assert sorted(r["event_id"] for r in tier_rows(store)) == [100, 101, 401]


def test_timestamp_inputs_are_accepted_as_microseconds(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    t = events_table(
        [
            ev(1, ts=1_700_000_000_000_000, arr=1_700_000_000_500_000),
            ev(2, ts=1_700_000_001_000_000, arr=1_700_000_002_000_000),
        ]
    )
    for c, typ in (("event_ts", pa.timestamp("us", tz="UTC")), ("arrival_ts", pa.timestamp("ms"))):
        i = t.column_names.index(c)
        col = t.column(c)
        if typ.unit == "ms":
            col = pa.array([v // 1000 for v in col.to_pylist()], pa.int64())
        t = t.set_column(i, c, col.cast(typ))
    pq.write_table(t, tmp_path / "ts.parquet")
    res = ingest_files(store, [str(tmp_path / "ts.parquet")])
    assert res.accepted == 2
    raw = read(store, "raw").sort_by("event_id")
    assert raw.schema.field("event_ts").type == pa.int64()
    assert raw.column("event_ts").to_pylist() == [1_700_000_000_000_000, 1_700_000_001_000_000]
    assert raw.column("arrival_ts").to_pylist() == [1_700_000_000_500_000, 1_700_000_002_000_000]


# ----------------------------------------------------------------------------- duplicates


def test_duplicate_within_file_first_one_wins(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    rows = [
        ev(1, item=10),
        ev(2, item=20),
        ev(1, item=11),
        ev(1, item=12, user=9),
        # the first row with id 3 is quarantined, so the second is the first *accepted* one
        {**ev(3, item=30), "action": None},
        ev(3, item=31),
    ]
    res = ingest_files(store, [write_events(tmp_path / "a.parquet", rows)])
    assert (res.accepted, res.duplicates, res.quarantined[REASON_NULL]) == (3, 2, 1)
    raw = {r["event_id"]: (r["user_id"], r["item_id"]) for r in read(store, "raw").to_pylist()}
    assert raw == {1: (1, 10), 2: (1, 20), 3: (1, 31)}


def test_duplicate_across_files_first_one_wins(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    a = write_events(tmp_path / "a.parquet", [ev(1, item=10), ev(2, item=20)])
    b = write_events(tmp_path / "b.parquet", [ev(2, item=99, user=5), ev(3, item=30)])
    c = write_events(tmp_path / "c.parquet", [ev(3, item=98), ev(1, item=97), ev(4, item=40)])
    r1 = ingest_files(store, [a])
    r2 = ingest_files(store, [b, c])  # one call, several files: still in order, file by file
    assert (r1.accepted, r1.duplicates) == (2, 0)
    assert (r2.accepted, r2.duplicates, r2.files) == (2, 3, 2)
    raw = read(store, "raw")
    assert sorted(raw.column("event_id").to_pylist()) == [1, 2, 3, 4]
    items = {r["event_id"]: r["item_id"] for r in raw.to_pylist()}
    assert items == {1: 10, 2: 20, 3: 30, 4: 40}
    srcs = {r["event_id"]: r["source"] for r in raw.to_pylist()}
    assert srcs == {1: "a.parquet", 2: "a.parquet", 3: "b.parquet", 4: "c.parquet"}
    rec = read(store, "ingests").to_pylist()
    assert sorted((r["accepted"], r["duplicates"]) for r in rec) == [(1, 1), (1, 2), (2, 0)]


# ----------------------------------------------------------------------------- idempotency


def test_reingest_same_file_is_a_noop(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    rows = [ev(1), ev(2, ts=30), {**ev(3), "user_id": None}, ev(1)]
    a = write_events(tmp_path / "a.parquet", rows)
    first = ingest_files(store, [a])
    assert (first.accepted, first.duplicates, first.skipped_files) == (1, 1, 0)
    versions = table_versions(store)
    files = tree(store.root)
    raw_before = read(store, "raw").sort_by("event_id")
    again = ingest_files(store, [a, a])
    # The same bytes under another name are the same batch too.
    copy = tmp_path / "copy-of-a.parquet"
    copy.write_bytes(Path(a).read_bytes())
    third = ingest_files(store, [str(copy)])
    for r in (again, third):
        assert r.accepted == 0 and r.duplicates == 0 and sum(r.quarantined.values()) == 0
        assert r.skipped_files == r.files
        assert r.version == versions["raw"]
    assert table_versions(store) == versions
    assert tree(store.root) == files
    assert read(store, "raw").sort_by("event_id").equals(raw_before)
    assert read(store, "quarantine").num_rows == 2
    assert read(store, "ingests").num_rows == 1


# ----------------------------------------------------------------------------- schema evolution


def test_additive_trait_column_is_accepted(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ingest_files(store, [write_events(tmp_path / "a.parquet", [ev(1), ev(2)], traits=["dwell_ms"])])
    publish_snapshot(store, 25)
    b = write_events(
        tmp_path / "b.parquet",
        [ev(3, arr=30, dwell_ms=1.5, surface=4), ev(4, arr=30, surface=2)],
        traits=["dwell_ms", "surface"],
    )
    res = ingest_files(store, [b])
    assert res.accepted == 2
    raw = read(store, "raw").sort_by("event_id")
    assert raw.schema.field("surface").type == pa.int16()
    assert raw.column("surface").to_pylist() == [None, None, 4, 2]
    assert raw.column("dwell_ms").to_pylist() == [None, None, 1.5, None]
    publish_snapshot(store, 40)
    tier = tier_rows(store)
    assert [(r["event_id"], r["surface"]) for r in tier] == [(1, None), (2, None), (3, 4), (4, 2)]
    # A file without the new trait is still fine after the evolution.
    res = ingest_files(store, [write_events(tmp_path / "c.parquet", [ev(5, arr=50)])])
    assert res.accepted == 1


@pytest.mark.parametrize(
    ("column", "bad_type"),
    [
        ("dwell_ms", pa.float64()),
        ("surface", pa.string()),
        ("item_id", pa.string()),
        ("action", pa.float32()),
    ],
)
def test_column_type_change_is_rejected_and_changes_nothing(
    tmp_path: Path, column: str, bad_type: pa.DataType
) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ingest_files(
        store,
        [
            write_events(
                tmp_path / "a.parquet",
                [ev(1, dwell_ms=1.0, surface=1)],
                traits=["dwell_ms", "surface"],
            )
        ],
    )
    versions, files = table_versions(store), tree(store.root)
    t = events_table([ev(2, dwell_ms=2.0, surface=2)], traits=["dwell_ms", "surface"])
    i = t.column_names.index(column)
    t = t.set_column(i, column, t.column(column).cast(bad_type))
    pq.write_table(t, tmp_path / "b.parquet")
    good = write_events(tmp_path / "c.parquet", [ev(3)])
    with pytest.raises(SchemaError) as ei:
        ingest_files(store, [good, str(tmp_path / "b.parquet")])  # a bad file anywhere: nothing
    msg = str(ei.value)
    assert "b.parquet" in msg and f"'{column}'" in msg and "\n" not in msg
    assert table_versions(store) == versions
    assert tree(store.root) == files


def test_two_files_of_one_call_that_disagree_on_a_type_are_rejected(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    a = write_events(tmp_path / "a.parquet", [ev(1, surface=1)], traits=["surface"])
    t = events_table([ev(2, surface=2)], traits=["surface"])
    t = t.set_column(
        t.column_names.index("surface"), "surface", t.column("surface").cast(pa.int64())
    )
    pq.write_table(t, tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match=r"b\.parquet.*'surface'"):
        ingest_files(store, [a, str(tmp_path / "b.parquet")])
    assert all(v is None for v in table_versions(store).values())


# ----------------------------------------------------------------------------- properties

_NULLABLE = st.sampled_from([None] * 14 + list(REQUIRED))


@st.composite
def event_rows(draw: st.DrawFn, src: int) -> list[dict[str, object]]:
    n = draw(st.integers(0, 14))
    rows = []
    for i in range(n):
        r = {
            "user_id": draw(st.integers(0, 3)),
            "event_id": draw(st.integers(0, 25)),
            "event_ts": draw(st.integers(0, 20)),
            "arrival_ts": draw(st.integers(0, 20)),
            "item_id": draw(st.integers(0, 5)),
            "action": draw(st.integers(1, 3)),
            "src": src,
            "row_no": i,
        }
        null = draw(_NULLABLE)
        if null is not None:
            r[null] = None
        rows.append(r)
    return rows


def model_ingest(rows, watermark, accepted, quarantine) -> dict[str, int]:
    """Spec section 2, one row at a time, in file order."""
    counts = Counter()
    for r in rows:
        key = (r["src"], r["row_no"])
        if any(r[c] is None for c in REQUIRED):
            quarantine[key] = REASON_NULL
        elif r["event_ts"] > r["arrival_ts"]:
            quarantine[key] = REASON_TS
        elif watermark is not None and r["arrival_ts"] < watermark:
            quarantine[key] = REASON_WATERMARK
        elif r["event_id"] in accepted:
            counts["duplicates"] += 1
            continue
        else:
            accepted[r["event_id"]] = r
            counts["accepted"] += 1
            continue
        counts[quarantine[key]] += 1
    return counts


@st.composite
def ingest_scenarios(draw: st.DrawFn, *, snapshots: bool):
    n_files = draw(st.integers(1, 4))
    files = [draw(event_rows(i)) for i in range(n_files)]
    order = draw(st.permutations(range(n_files)))
    # Re-ingests anywhere after a file's first ingest.
    ops: list[tuple[str, int]] = [("ingest", i) for i in order]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.sampled_from(order))
        pos = draw(st.integers(order.index(i) + 1, len(ops)))
        ops.insert(pos, ("ingest", i))
    if snapshots:
        w = draw(st.integers(0, 8))
        for _ in range(draw(st.integers(0, 3))):
            ops.insert(draw(st.integers(0, len(ops))), ("snapshot", w))
            w += draw(st.integers(1, 8))
        # Watermarks must increase in op order: renumber them in the order they occur.
        ws = sorted(v for k, v in ops if k == "snapshot")
        it = iter(ws)
        ops = [(k, next(it)) if k == "snapshot" else (k, v) for k, v in ops]
    return files, ops


def run_scenario(root: Path, files, ops):
    store = init_store(str(root / "s"), n_buckets=2, row_group_rows=64)
    paths = [
        write_events(root / f"f{i}.parquet", rows, traits=["src", "row_no"])
        for i, rows in enumerate(files)
    ]
    accepted: dict[int, dict] = {}
    quarantine: dict[tuple[int, int], str] = {}
    done: set[int] = set()
    watermark = None
    snaps = []
    for kind, v in ops:
        if kind == "snapshot":
            publish_snapshot(store, v)
            watermark = v
            snaps.append((v, set(accepted)))
            continue
        versions = table_versions(store)
        res = ingest_files(store, [paths[v]])
        if v in done:
            assert res.skipped_files == 1 and res.accepted == 0 and res.duplicates == 0
            assert table_versions(store) == versions
            continue
        done.add(v)
        want = model_ingest(files[v], watermark, accepted, quarantine)
        assert res.accepted == want["accepted"]
        assert res.duplicates == want["duplicates"]
        assert res.quarantined == {r: want[r] for r in (REASON_NULL, REASON_TS, REASON_WATERMARK)}
    return store, accepted, quarantine, snaps


def check_store_against_model(store, accepted, quarantine) -> None:
    raw = read(store, "raw")
    got = sorted((r["event_id"], r["src"], r["row_no"]) for r in raw.to_pylist())
    assert got == sorted((e, r["src"], r["row_no"]) for e, r in accepted.items())
    q = read(store, "quarantine")
    got_q = sorted(((r["src"], r["row_no"]), r["reason"]) for r in q.to_pylist())
    assert got_q == sorted(quarantine.items())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=ingest_scenarios(snapshots=True))
def test_property_ingest_follows_the_spec_row_by_row(tmp_path_factory, scenario) -> None:
    files, ops = scenario
    root = tmp_path_factory.mktemp("prop")
    store, accepted, quarantine, snaps = run_scenario(root, files, ops)
    check_store_against_model(store, accepted, quarantine)
    # Snapshot k holds exactly the accepted events with arrival_ts < W_k.
    for k, (w, _) in enumerate(snaps):
        want = sorted(e for e, r in accepted.items() if r["arrival_ts"] < w)
        assert [r["event_id"] for r in tier_rows(store, max_snapshot=k)] == want


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=ingest_scenarios(snapshots=False), data=st.data())
def test_property_accepted_set_is_independent_of_order_and_reingests(
    tmp_path_factory, scenario, data
) -> None:
    files, ops = scenario
    valid = {
        r["event_id"]
        for rows in files
        for r in rows
        if all(r[c] is not None for c in REQUIRED) and r["event_ts"] <= r["arrival_ts"]
    }
    other = data.draw(st.permutations(ops))
    ids = []
    for i, o in enumerate((ops, other)):
        store, accepted, quarantine, _ = run_scenario(tmp_path_factory.mktemp(f"o{i}"), files, o)
        check_store_against_model(store, accepted, quarantine)
        raw_ids = [r["event_id"] for r in read(store, "raw").to_pylist()]
        assert len(raw_ids) == len(set(raw_ids))
        ids.append(set(raw_ids))
    assert ids[0] == ids[1] == valid


# ----------------------------------------------------------------------------- crash safety

_INGEST_SCRIPT = (
    "import sys; from lmat_platform.store import ingest_files; "
    "ingest_files(sys.argv[1], sys.argv[2:])"
)


def _batch_files(
    root: Path,
    n_files: int,
    rows_per_file: int,
    *,
    src_base: int = 0,
    first_id=lambda f, n: f * n,
    seed: int = 0,
) -> tuple[list[str], dict[int, dict]]:
    """Event files (ids from ``first_id(file, rows)``), ~3% of rows with event_ts > arrival_ts.

    Returns the paths and, per file (its ``src`` trait), the valid ids and the invalid count.
    """
    rng = np.random.default_rng(seed)
    paths, info = [], {}
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        n = rows_per_file
        eid = first_id(f, n) + np.arange(n)
        ets = rng.integers(0, 1000, n)
        bad = rng.random(n) < 0.03
        arr = np.where(bad, ets - 1, ets + rng.integers(0, 50, n))
        src = src_base + f
        t = pa.table(
            {
                "user_id": pa.array(rng.integers(0, 50, n), pa.int64()),
                "event_id": pa.array(eid, pa.int64()),
                "event_ts": pa.array(ets, pa.int64()),
                "arrival_ts": pa.array(arr, pa.int64()),
                "item_id": pa.array(rng.integers(0, 100, n), pa.int64()),
                "action": pa.array(rng.integers(1, 4, n), pa.int16()),
                "src": pa.array(np.full(n, src), pa.int16()),
            }
        )
        p = root / f"batch-{src:03d}.parquet"
        pq.write_table(t, p)
        paths.append(str(p))
        info[src] = {"valid": set(eid[~bad].tolist()), "invalid": int(bad.sum())}
    return paths, info


def check_whole_batches(store, info: dict[int, dict]) -> set[int]:
    """The store holds whole batches only: raw, quarantine and ingest records per file."""
    raw = read(store, "raw")
    ids = raw.column("event_id").to_pylist() if raw.num_rows else []
    assert len(ids) == len(set(ids)), "an event id is in the raw log twice"
    by_src: dict[int, set[int]] = {}
    for r in raw.select(["src", "event_id"]).to_pylist() if raw.num_rows else []:
        by_src.setdefault(r["src"], set()).add(r["event_id"])
    for s, got in by_src.items():
        assert got == info[s]["valid"], f"file {s} is in the raw log partly"
    q = read(store, "quarantine")
    qc = Counter(q.column("src").to_pylist()) if q.num_rows else Counter()
    for s, n in qc.items():
        assert n == info[s]["invalid"], f"file {s} is in the quarantine partly (or twice)"
    rec = read(store, "ingests")
    rec_ids = rec.column("batch_id").to_pylist() if rec.num_rows else []
    assert len(rec_ids) == len(set(rec_ids))
    assert len(rec_ids) <= len(by_src)
    return set(by_src)


def test_batch_killed_after_its_quarantine_commit_resumes_to_the_same_rows(
    tmp_path: Path,
) -> None:
    """A batch killed right after its quarantine commit (the store's fault switch) is finished
    by a re-run that matches the landed ``behind_watermark`` rows one for one, repeated
    ``(event_id, arrival_ts)`` pairs included: the same quarantine and raw log as one clean run."""
    got = {}
    for mode in ("clean", "killed"):
        store = init_store(str(tmp_path / mode), n_buckets=2, row_group_rows=64)
        ingest_files(store, [write_events(tmp_path / f"{mode}-a.parquet",
                                          [ev(i, ts=999 + i, arr=1000 + i) for i in range(20)])])
        publish_snapshot(store, 1010)
        late = write_events(tmp_path / f"{mode}-b.parquet", [
            ev(e, ts=a - 1, arr=a) for e, a in ((200, 10), (200, 10), (201, 20), (202, 30),
                                                (202, 30), (202, 31), (203, 1200), (300, 1200),
                                                (200, 11))])
        if mode == "killed":
            r = subprocess.run([sys.executable, "-m", "lmat_platform.cli", "ingest", store.root,
                                late], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "LMAT_FAULT_KILL_AFTER_COMMIT": "1"})
            assert r.returncode == -signal.SIGKILL, r.stderr
            assert read(store, "quarantine").num_rows == 7
        res = ingest_files(store, [late])
        q = read(store, "quarantine")
        got[mode] = (sorted(zip(q.column("event_id").to_pylist(),
                                q.column("arrival_ts").to_pylist(),
                                q.column("reason").to_pylist(), strict=True)),
                     sorted(read(store, "raw").column("event_id").to_pylist()))
        assert res.quarantined[REASON_WATERMARK] == 7  # the same decisions in both runs
    assert got["killed"] == got["clean"]
    assert len(got["clean"][0]) == 7


def test_sigkill_part_way_leaves_whole_batches_and_a_rerun_completes(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=4, row_group_rows=64)
    paths, info = _batch_files(tmp_path / "in", 24, 300, seed=1)
    rng = random.Random(20240601)
    landed: list[int] = []
    log_dir = Path(store.root) / "ingests" / "_delta_log"

    def n_commits() -> int:
        return len(list(log_dir.glob("*.json"))) if log_dir.exists() else 0

    for _ in range(5):
        p = subprocess.Popen(
            [sys.executable, "-c", _INGEST_SCRIPT, store.root, *paths],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill once this run has recorded a file, then after a random extra delay, so the kill
        # lands part way through a batch whatever the machine's load (fixed delays did not:
        # under load every kill landed before the interpreter had imported lmat).
        start = n_commits()
        while p.poll() is None and n_commits() <= start:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        landed.append(len(check_whole_batches(store, info)))
    assert landed == sorted(landed)
    res = ingest_files(store, paths)
    got = check_whole_batches(store, info)
    assert got == set(info)
    all_valid = set().union(*(v["valid"] for v in info.values()))
    assert set(read(store, "raw").column("event_id").to_pylist()) == all_valid
    assert read(store, "raw").num_rows == len(all_valid)
    assert read(store, "ingests").num_rows == len(paths)
    assert read(store, "quarantine").num_rows == sum(v["invalid"] for v in info.values())
    assert res.duplicates == 0
    # Whatever the kills interrupted, nothing of a batch is counted twice in the records.
    rec = read(store, "ingests")
    assert sum(rec.column("accepted").to_pylist()) == len(all_valid)
    # Some kill must have hit after the first batch and before the last (else this proved little).
    assert any(0 < n < len(paths) for n in landed), landed


def test_two_concurrent_ingests_lose_nothing(tmp_path: Path) -> None:
    store = init_store(str(tmp_path / "s"), n_buckets=4, row_group_rows=64)
    # A's files hold ids 0..2399; each file of B overlaps one of A by half.
    a, ia = _batch_files(tmp_path / "a", 4, 600, seed=2)
    b, ib = _batch_files(
        tmp_path / "b", 4, 600, src_base=100, seed=3, first_id=lambda f, n: f * n + n // 2
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _INGEST_SCRIPT, store.root, *files],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for files in (a + [b[0]], b + [a[1]])
    ]  # each also ingests one file of the other
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    info = ia | ib
    raw = read(store, "raw")
    ids = raw.column("event_id").to_pylist()
    union = set().union(*(v["valid"] for v in info.values()))
    assert len(ids) == len(set(ids)) and set(ids) == union
    rec = read(store, "ingests")
    assert rec.num_rows == len(a) + len(b)  # the shared files are recorded once
    total_valid = sum(len(v["valid"]) for v in info.values())
    assert sum(rec.column("accepted").to_pylist()) == len(union)
    assert sum(rec.column("duplicates").to_pylist()) == total_valid - len(union)
    assert read(store, "quarantine").num_rows == sum(v["invalid"] for v in info.values())
    # Every accepted row is the row of a file that holds that id.
    for r in raw.select(["event_id", "src"]).to_pylist():
        assert r["event_id"] in info[r["src"]]["valid"]
