"""The bifurcated protocol (spec sections 4 and 5): pointers, thin rows on both paths, O2O
checks, bad request input, and parity on the synthetic workload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from hypothesis import given
from hypothesis import strategies as st

from lmat_platform.exceptions import O2OConsistencyError, RequestError, ThinTableError
from lmat_platform.fatrows import write_fat_rows
from lmat_platform.hashing import as_signed, event_fingerprint
from lmat_platform.protocol import POINTER_BYTES, Pointer, write_thin
from lmat_platform.protocol.thin import POINTER_COLUMNS
from lmat_platform.reconstruct import materialize
from lmat_platform.store import (
    forget_users,
    ingest_files,
    init_store,
    list_snapshots,
    publish_snapshot,
)
from lmat_platform.store.snapshots import resolve_snapshot
from lmat_platform.tenants import Tenant
from lmat_platform.validate import check_leakage, compare_outputs, reference_sequences
from tests.conftest import SynthStore
from tests.helpers import (
    assert_matches,
    delta_version,
    expected_outputs,
    one_line_error,
    read,
    read_delta,
    requests_table,
    run_lmat,
    run_main,
    tier_rows,
    write_events,
)

U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- pointer


def test_pointer_fits_in_32_bytes() -> None:
    p = Pointer(snapshot_id=2**31 - 1, head_len=2**31 - 1, head_checksum=U64)
    assert len(p.pack()) == POINTER_BYTES == 16 <= 32
    assert len(Pointer(-1, 0, 0).pack()) == 16


@given(
    snap=st.integers(-1, 2**31 - 1),
    n=st.integers(0, 2**31 - 1),
    cs=st.integers(0, U64),
)
def test_pointer_round_trip(snap: int, n: int, cs: int) -> None:
    p = Pointer(snap, n, cs)
    b = p.pack()
    assert len(b) == 16
    assert Pointer.unpack(b) == p


def test_pointer_columns_of_thin_rows_take_16_bytes(synth_store_ro: SynthStore) -> None:
    thin = read_delta(synth_store_ro.thin_log)
    ptr = thin.select(list(POINTER_COLUMNS)).combine_chunks()
    width = sum(f.type.bit_width // 8 for f in ptr.schema)
    assert width == 16 <= 32
    # Measured on the Arrow data itself: bytes per row of the three columns (no nulls).
    assert all(ptr.column(c).null_count == 0 for c in POINTER_COLUMNS)
    # (at most one validity bit per column and row on top, and a few bytes of buffer rounding)
    assert ptr.nbytes <= 16 * ptr.num_rows + 3 * (ptr.num_rows // 8 + 1)


# ----------------------------------------------------------------------------- thin rows


def _thin_files(uri: str) -> list[str]:
    return sorted(str(f) for f in Path(uri).rglob("*.parquet"))


def test_thin_files_are_written_compactly(synth_store_ro: SynthStore, tmp_path: Path) -> None:
    """Thin files (both paths): zstd pages, tail times and ids delta-encoded, the other numeric
    columns byte-stream-split, statistics only where a reader can prune by them, no copy of the
    Arrow schema; and at most 0.6x the bytes of the same rows in LZ4 plain pages."""
    for uri in (synth_store_ro.thin_log, synth_store_ro.thin_batch):
        new = old = 0
        for f in _thin_files(uri):
            md = pq.read_metadata(f)
            assert b"ARROW:schema" not in (md.metadata or {})
            rg = md.row_group(0)
            cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(md.num_columns)}
            assert {c.compression for c in cols.values()} == {"ZSTD"}
            assert "DELTA_BINARY_PACKED" in cols["tail_arrival_ts.list.element"].encodings
            assert "DELTA_BINARY_PACKED" in cols["tail_event_id.list.element"].encodings
            for c in ("tail_item_id.list.element", "tail_dwell_ms.list.element", "request_ts"):
                assert "BYTE_STREAM_SPLIT" in cols[c].encodings, c
            assert cols["user_id"].is_stats_set
            assert not cols["tail_item_id.list.element"].is_stats_set
            new += Path(f).stat().st_size
            rows = pq.read_table(f, partitioning=None)
            out = tmp_path / "old.parquet"
            pq.write_table(rows, out, compression="lz4", use_dictionary=False)
            old += out.stat().st_size
        assert new <= 0.6 * old, (uri, new, old)


def test_pointers_and_tails_follow_the_spec(synth_store_ro: SynthStore) -> None:
    s = synth_store_ro
    store = s.store
    snaps = list_snapshots(store)
    pub = np.array([x.published_at for x in snaps])
    wm = np.array([x.watermark for x in snaps])
    tier = tier_rows(store)
    raw = sorted(read(store, "raw").to_pylist(), key=lambda r: (r["event_ts"], r["event_id"]))
    log_rows = {r["request_id"]: r for r in read_delta(s.thin_log).to_pylist()}
    batch_rows = {r["request_id"]: r for r in read_delta(s.thin_batch).to_pylist()}
    assert (
        sorted(log_rows) == sorted(batch_rows)
        and len(log_rows) == pq.read_metadata(s.requests_all).num_rows
    )
    n_tail = n_head = 0
    for rid, r in log_rows.items():
        b = batch_rows[rid]
        S = int(resolve_snapshot(pub, np.array([r["request_ts"]]))[0])
        assert int(np.searchsorted(pub, r["request_ts"], side="right")) - 1 == S
        head = [e for e in tier if e["user_id"] == r["user_id"] and e["snapshot_id"] <= S]
        csum = (
            int(
                np.sum(
                    event_fingerprint(
                        np.array([e["event_id"] for e in head], np.int64),
                        np.array([e["event_ts"] for e in head], np.int64),
                    ),
                    dtype=np.uint64,
                )
            )
            if head
            else 0
        )
        want = (S, len(head), int(as_signed(np.array([csum], np.uint64))[0]))
        for row in (r, b):
            assert tuple(row[c] for c in POINTER_COLUMNS) == want
        # Streaming tail: events of u with W_S <= arrival < T. Stored once per user and file
        # (in arrival order, in the row named by tail_block), the row points at its run.
        lo = wm[S] if S >= 0 else np.iinfo(np.int64).min
        tail = [
            e for e in raw
            if e["user_id"] == r["user_id"] and lo <= e["arrival_ts"] < r["request_ts"]
        ]
        by_arrival = [e["event_id"] for e in sorted(tail, key=lambda e: (e["arrival_ts"],
                                                                         e["event_id"]))]
        owner = log_rows[r["tail_block"]]
        assert owner["user_id"] == r["user_id"] and owner["tail_block"] == owner["request_id"]
        if owner is not r:
            assert r["tail_event_id"] == []  # only the user's first row stores events
        stored = owner["tail_event_id"]
        assert len(set(stored)) == len(stored), "a user's tail event is stored twice"
        a = r["tail_start"]
        assert r["tail_len"] == len(tail) and stored[a:a + r["tail_len"]] == by_arrival
        # Batch rows carry no tail at all.
        assert b["tail_len"] is None and b["tail_event_id"] is None
        n_tail += len(tail) > 0
        n_head += len(head) > 0
    assert n_tail > 0 and n_head > 0


def test_synth_store_parity_for_several_tenants(synth_store_ro: SynthStore, tmp_path: Path) -> None:
    s = synth_store_ro
    store = s.store
    raw = read(store, "raw")
    requests = pq.read_table(s.requests_all)
    events = raw.to_pylist()
    reqs = requests.to_pylist()
    tenants = [
        Tenant("retrieval", ("item_id", "action", "event_id"), 3, actions=(1, 2)),
        Tenant("ranking", ("item_id", "event_ts", "event_id", "dwell_ms"), 70, window_days=0.5),
        Tenant("long", ("event_id", "surface"), 10_000),
        Tenant("tiny", ("event_id",), 1),
    ]
    for t in tenants:
        want = expected_outputs(events, reqs, t)
        for name, thin in (("streaming", s.thin_log), ("batch", s.thin_batch)):
            out = str(tmp_path / f"{t.name}-{name}.parquet")
            res = materialize(store, thin, t, out)
            assert res["requests"] == requests.num_rows
            got = pq.read_table(out)
            assert got.column_names == ["request_id", "user_id", "request_ts", "length", *t.columns]
            assert_matches(got, want, label=f"{t.name} {name}")
        fat = str(tmp_path / f"{t.name}-fat.parquet")
        write_fat_rows(store, requests, t, fat)
        assert_matches(pq.read_table(fat), want, label=f"{t.name} fat")
        ref = reference_sequences(raw, requests, t)
        assert compare_outputs(ref, pq.read_table(str(tmp_path / f"{t.name}-batch.parquet"))).ok
    # Somebody has a long history here, so the marker-based pruning was exercised.
    assert max(len(v["event_id"]) for v in expected_outputs(events, reqs, tenants[2]).values()) > 64


# ----------------------------------------------------------------------------- bad requests


def _requests(path: Path, rows: list[dict], **extra: pa.DataType) -> str:
    pq.write_table(requests_table(rows, **extra), path)
    return str(path)


def test_request_file_problems_are_one_line_errors_and_write_nothing(
    synth_store: SynthStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = synth_store
    ok_rows = [{"request_id": 1, "user_id": 3, "request_ts": 10**15}]
    missing = tmp_path / "no-id.parquet"
    pq.write_table(requests_table(ok_rows).drop_columns(["request_id"]), missing)
    dup = _requests(tmp_path / "dup.parquet", ok_rows + [{**ok_rows[0], "user_id": 4}])
    reserved = tmp_path / "reserved.parquet"
    pq.write_table(requests_table(ok_rows).append_column("tail_x", pa.array([1])), reserved)
    existing = pq.read_table(s.requests_all).slice(0, 2)
    clash = tmp_path / "clash.parquet"
    pq.write_table(existing, clash)
    cases = [
        (str(missing), ("no-id.parquet", "'request_id'")),
        (dup, ("dup.parquet", "duplicate request_id 1")),
        (str(reserved), ("reserved.parquet", "'tail_x'")),
        (str(clash), ("clash.parquet", str(existing.column("request_id")[0].as_py()))),
        (str(tmp_path / "none.parquet"), ("none.parquet",)),
    ]
    for cmd, out in (("log", s.thin_log), ("examples", s.thin_batch)):
        for path, names in cases:
            before = delta_version(out)
            code, stdout, err = run_main(capsys, [cmd, s.store_path, path, "--out", out])
            assert code == 2 and stdout == "", err
            line = one_line_error(err)
            for n in names:
                assert n in line, (cmd, line)
            assert delta_version(out) == before
    # A new thin table is not even created.
    fresh = tmp_path / "fresh-thin"
    with pytest.raises(RequestError, match="duplicate request_id"):
        write_thin(s.store_path, dup, str(fresh), path="log")
    assert not fresh.exists()


def test_thin_table_of_another_store_is_refused(synth_store: SynthStore, tmp_path: Path) -> None:
    s = synth_store
    other = init_store(str(tmp_path / "other"), n_buckets=4, row_group_rows=64)
    req = _requests(
        tmp_path / "r.parquet", [{"request_id": 10**12, "user_id": 3, "request_ts": 10**15}]
    )
    foreign = str(tmp_path / "foreign-thin")
    write_thin(other, req, foreign, path="examples")
    v = delta_version(foreign)
    r = run_lmat("log", s.store_path, req, "--out", foreign)
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "foreign-thin" in line and other.store_id in line
    assert delta_version(foreign) == v
    tenants = tmp_path / "t.yaml"
    tenants.write_text("tenants:\n  - {name: a, columns: [item_id], max_len: 5}\n")
    out = tmp_path / "out.parquet"
    r = run_lmat(
        "materialize",
        s.store_path,
        foreign,
        "--tenants",
        str(tenants),
        "--tenant",
        "a",
        "--out",
        str(out),
    )
    assert r.returncode == 2 and "foreign-thin" in one_line_error(r.stderr)
    assert not out.exists()
    with pytest.raises(ThinTableError):
        materialize(s.store_path, foreign, Tenant("a", ("item_id",), 5), str(out))
    assert not out.exists()


# ----------------------------------------------------------------------------- O2O


def _tamper(uri: str, pick, *, column: str = "head_checksum") -> dict:
    """Rewrite the thin table with one row's pointer changed; returns the changed row."""
    dt = DeltaTable(uri)
    desc = dt.metadata().description
    t = read_delta(uri)
    rows = t.to_pylist()
    i = next(i for i, r in enumerate(rows) if pick(r))
    vals = t.column(column).to_pylist()
    vals[i] = vals[i] + 1
    t = t.set_column(
        t.column_names.index(column), column, pa.array(vals, t.schema.field(column).type)
    )
    write_deltalake(uri, t, mode="overwrite", partition_by=["bucket"], description=desc)
    assert DeltaTable(uri).metadata().description == desc
    return rows[i]


@pytest.mark.parametrize("column", ["head_checksum", "head_len"])
def test_o2o_mismatch_names_the_request(
    synth_store: SynthStore, tmp_path: Path, column: str
) -> None:
    s = synth_store
    t = Tenant("t", ("item_id",), 2)
    row = _tamper(s.thin_log, lambda r: r["head_len"] > 3, column=column)
    out = tmp_path / "o.parquet"
    with pytest.raises(O2OConsistencyError) as ei:
        materialize(s.store_path, s.thin_log, t, str(out))
    assert f"request {row['request_id']}" in str(ei.value)
    assert not out.exists()
    tenants = tmp_path / "t.yaml"
    tenants.write_text("tenants:\n  - {name: t, columns: [item_id], max_len: 2}\n")
    r = run_lmat(
        "materialize",
        s.store_path,
        s.thin_log,
        "--tenants",
        str(tenants),
        "--tenant",
        "t",
        "--out",
        str(out),
    )
    assert r.returncode != 0
    assert str(row["request_id"]) in one_line_error(r.stderr)
    assert not out.exists()
    # Checks can be switched off explicitly.
    materialize(s.store_path, s.thin_log, t, str(out), verify=False)
    assert out.exists()


def test_o2o_mismatch_of_a_forgotten_user_is_not_an_error(
    synth_store: SynthStore, tmp_path: Path
) -> None:
    s = synth_store
    row = _tamper(s.thin_batch, lambda r: r["head_len"] > 3)
    # A copy the store does not know of (forget removes the user's rows from the registered
    # thin tables only) still holds the user's requests, with pointers to a deleted head.
    stale = str(tmp_path / "stale-thin")
    shutil.copytree(s.thin_batch, stale)
    forget_users(s.store_path, [row["user_id"]])
    out = str(tmp_path / "o.parquet")
    materialize(s.store_path, stale, Tenant("t", ("item_id",), 5), out)
    got = pq.read_table(out)
    mine = got.filter(pc.equal(got.column("user_id"), row["user_id"]))
    assert mine.num_rows and set(mine.column("length").to_pylist()) == {0}


# ----------------------------------------------------------------------------- leakage


def test_leakage_validator_detects_an_injected_future_event(
    synth_store_ro: SynthStore, tmp_path: Path
) -> None:
    s = synth_store_ro
    t = Tenant("t", ("event_id", "item_id"), 50)
    out = str(tmp_path / "o.parquet")
    materialize(s.store, s.thin_log, t, out)
    got = pq.read_table(out)
    raw = read(s.store, "raw")
    rep = check_leakage(got, raw, t)
    assert rep.ok and rep.checked == got.num_rows
    rows = got.to_pylist()
    i = next(i for i, r in enumerate(rows) if r["length"] > 1)
    T = rows[i]["request_ts"]
    future = next(e for e in raw.to_pylist() if e["arrival_ts"] >= T)
    bad = [dict(r) for r in rows]
    bad[i]["event_id"] = [*bad[i]["event_id"][:-1], future["event_id"]]
    tampered = pa.Table.from_pylist(bad, schema=got.schema)
    rep = check_leakage(tampered, raw, t)
    assert not rep.ok and rep.counts["future_leakage"] == 1
    assert str(rows[i]["request_id"]) in " ".join(rep.problems)
    # An event arriving exactly at T is future too (arrival_ts < T is the rule).
    at_t = [e for e in raw.to_pylist() if e["arrival_ts"] == T]
    if at_t:
        bad[i]["event_id"] = [*rows[i]["event_id"][:-1], at_t[0]["event_id"]]
        rep = check_leakage(pa.Table.from_pylist(bad, schema=got.schema), raw, t)
        assert rep.counts.get("future_leakage", 0) >= 1


def test_materialize_summary_is_one_json_line(synth_store_ro: SynthStore, tmp_path: Path) -> None:
    s = synth_store_ro
    tenants = tmp_path / "t.yaml"
    tenants.write_text("tenants:\n  - {name: r, columns: [item_id, event_ts], max_len: 8}\n")
    out = tmp_path / "o.parquet"
    r = run_lmat(
        "materialize",
        s.store_path,
        s.thin_batch,
        "--tenants",
        str(tenants),
        "--tenant",
        "r",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["requests"] == pq.read_metadata(out).num_rows > 0
    t = pq.read_table(out)
    assert t.schema.field("length").type == pa.int32()
    assert t.schema.field("item_id").type == pa.list_(pa.int64())
    assert pc.max(t.column("length")).as_py() == 8


def test_trait_added_after_rows_were_logged(tmp_path: Path) -> None:
    """A trait that appears in a later file: rows logged before it existed have no tail column
    for it (null), the newest snapshot's tier lacks it; both read as nulls, not as errors."""
    st_ = init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)

    def ev(eid: int, ts: int, **kw: object) -> dict:
        return {
            "user_id": 7,
            "event_id": eid,
            "event_ts": ts,
            "arrival_ts": ts,
            "item_id": eid,
            "action": 1,
            **kw,
        }

    ingest_files(st_, [write_events(tmp_path / "a.parquet", [ev(1, 10), ev(2, 20)])])
    publish_snapshot(st_, 15)
    thin = str(tmp_path / "thin")
    first = write_thin(
        st_,
        _requests(tmp_path / "r1.parquet", [{"request_id": 1, "user_id": 7, "request_ts": 25}]),
        thin,
        path="log",
    )
    ingest_files(
        st_, [write_events(tmp_path / "b.parquet", [ev(3, 30, dwell_ms=2.5)], traits=["dwell_ms"])]
    )
    second = write_thin(
        st_,
        _requests(tmp_path / "r2.parquet", [{"request_id": 2, "user_id": 7, "request_ts": 35}]),
        thin,
        path="log",
    )
    # Each append reports the version it committed (an append writes through the opened table).
    from deltalake import DeltaTable

    assert (first["version"], second["version"]) == (0, DeltaTable(thin).version()) != (0, 0)
    t = Tenant("d", ("event_id", "dwell_ms"), 10)
    out = str(tmp_path / "o.parquet")
    materialize(st_, thin, t, out)
    got = {r["request_id"]: (r["event_id"], r["dwell_ms"]) for r in pq.read_table(out).to_pylist()}
    assert got == {1: ([1, 2], [None, None]), 2: ([1, 2, 3], [None, None, 2.5])}


def test_head_index_of_an_unsorted_file_is_sorted_whatever_the_user_ids() -> None:
    """The head index skips its sort only for rows already in (user, snapshot) order; user ids
    far apart (a difference beyond int64) are compared, not subtracted."""
    from lmat_platform.protocol.pointers import HeadIndex
    from lmat_platform.store.heads import MARKER_LENGTHS

    big = 3 << 61
    t = pa.table({
        "user_id": pa.array([big, -big, 5], pa.int64()),
        "snapshot_id": pa.array([1, 1, 2], pa.int32()),
        "head_len": pa.array([1, 2, 3], pa.int64()),
        "head_checksum": pa.array([7, 8, 9], pa.int64()),
        "markers": pa.array([[0] * len(MARKER_LENGTHS)] * 3, pa.list_(pa.int64())),
    })
    idx = HeadIndex._from_table(t)
    assert idx.user_id.tolist() == [-big, 5, big]
    assert idx.head_len.tolist() == [2, 3, 1]
