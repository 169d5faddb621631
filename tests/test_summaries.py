"""The summary tier (spec section 10): incremental == from scratch, point-in-time serving
(summaries published late, requests between a snapshot's and its summary's publish, forgotten
users), the loader's summary batches, and tenant declarations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lmat_platform as lmat
from lmat_platform.exceptions import TenantError, WatermarkError
from lmat_platform.models.vista import Summarizer, VistaConfig, VistaState
from lmat_platform.store.core import Store
from lmat_platform.summaries import (
    SummaryError,
    SummaryServer,
    check_served,
    compute_summaries,
    recompute_check,
    register_summarizer,
    storage_report,
    summary_registry,
)
from lmat_platform.summaries.tier import read_summary_rows
from lmat_platform.tenants import parse_tenants
from tests.helpers import HOUR_US, events_table, requests_table

T0 = 1_700_000_000_000_000
CFG = VistaConfig(n_items=512, d=16, k=4, heads=2, layers=2, window=4)
N_USERS = 10
N_SNAPS = 3
LAG = HOUR_US  # summaries published an hour after their snapshot


def _events(seed: int = 0) -> pa.Table:
    """Events over 3 snapshot windows of 4 h, with late arrivals (event_ts in an earlier
    window than arrival_ts) so a snapshot's new events sort inside the older head."""
    rng = np.random.default_rng(seed)
    rows = []
    eid = 0
    for u in range(1, N_USERS + 1):
        n = int(rng.integers(0, 40)) if u != 3 else 0
        if u == 2:
            n = 60
        for _ in range(n):
            arr = T0 + int(rng.integers(0, (N_SNAPS + 1) * 4 * HOUR_US))
            late = rng.random() < 0.3
            ets = arr - (int(rng.integers(0, 8 * HOUR_US)) if late else int(rng.integers(0, 1000)))
            rows.append({"user_id": u, "event_id": eid, "event_ts": ets, "arrival_ts": arr,
                         "item_id": int(rng.integers(0, 300)), "action": int(rng.integers(0, 3))})
            eid += 1
    return events_table(rows)


def _watermark(k: int) -> int:
    return T0 + (k + 1) * 4 * HOUR_US


def _small_store(tmp_path: Path, seed: int) -> tuple[Store, pa.Table, str]:
    """A 2-bucket store holding ``_events(seed)``, with summarizer "m" registered: (store, events,
    summarizer version)."""
    store = lmat.init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    ev = _events(seed)
    pq.write_table(ev, str(tmp_path / "e.parquet"))
    lmat.ingest_files(store, [str(tmp_path / "e.parquet")])
    return store, ev, register_summarizer(store, "m", Summarizer(CFG))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str, pa.Table]:
    root = tmp_path_factory.mktemp("summ")
    store = lmat.init_store(str(root / "store"), n_buckets=4, row_group_rows=64)
    ev = _events()
    pq.write_table(ev, str(root / "ev.parquet"))
    lmat.ingest_files(store, [str(root / "ev.parquet")])
    torch.manual_seed(0)
    model = Summarizer(CFG).eval()
    version = register_summarizer(store, "vista", model)
    for k in range(N_SNAPS):
        lmat.publish_snapshot(store, _watermark(k))
        compute_summaries(store, version, k, model_name="vista",
                          published_at=_watermark(k) + LAG)
    return store, version, ev


def _naive_state(model: Summarizer, ev: pa.Table, user: int, snapshot: int) -> VistaState:
    """The user's head at ``snapshot`` folded from zero, ordered by (snapshot, event_ts,
    event_id), with snapshots assigned from arrival times (an independent statement)."""
    rows = [r for r in ev.to_pylist() if r["user_id"] == user
            and r["arrival_ts"] < _watermark(snapshot)]
    snap_of = [next(k for k in range(N_SNAPS) if r["arrival_ts"] < _watermark(k)) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (snap_of[i], rows[i]["event_ts"],
                                                    rows[i]["event_id"]))
    rows = [rows[i] for i in order]
    return model.extend(VistaState.zeros(model.cfg, 1),
                        np.array([r["item_id"] for r in rows], np.int64),
                        np.array([r["action"] for r in rows], np.int64),
                        np.array([r["event_ts"] for r in rows], np.int64),
                        np.array([0, len(rows)]))


def test_incremental_matches_scratch_and_naive(built: tuple[Store, str, pa.Table]) -> None:
    store, version, ev = built
    model = lmat.summaries.load_summarizer(store, version)
    for k in range(N_SNAPS):
        rep = recompute_check(store, version, k)
        assert rep.ok, rep
        assert rep.users > 0
    # Every user with events has a summary at the snapshot that last touched them, equal to
    # the naive fold of their head.
    rows = read_summary_rows(store, version)
    got = {(r["user_id"], r["snapshot_id"]): r for r in rows.to_pylist()}
    for (u, k), r in got.items():
        naive = _naive_state(model, ev, u, k)
        assert r["head_len"] == int(naive.n[0])
        tok = model.summarize(naive)[0].numpy()
        q = np.frombuffer(r["tokens"], np.int8).reshape(CFG.k, CFG.d).astype(np.float32)
        sc = np.frombuffer(r["scales"], np.float32)
        np.testing.assert_allclose(q * sc[:, None], tok, atol=float(sc.max()) * 0.51 + 1e-6)
    assert 3 not in {u for u, _ in got}  # no events, no summary


def test_registry_order_and_publish_times(built: tuple[Store, str, pa.Table]) -> None:
    store, version, _ = built
    reg = summary_registry(store, version)
    assert [e.snapshot_id for e in reg] == list(range(N_SNAPS))
    snaps = lmat.list_snapshots(store)
    assert all(e.published_at >= s.published_at for e, s in zip(reg, snaps, strict=True))
    # Idempotent: computing a published snapshot again returns it as it was.
    again = compute_summaries(store, version, 1, published_at=_watermark(1) + 5 * LAG)
    assert again.published_at == reg[1].published_at


def test_out_of_order_and_bad_publish_time(tmp_path: Path) -> None:
    store = lmat.init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    pq.write_table(_events(1), str(tmp_path / "e.parquet"))
    lmat.ingest_files(store, [str(tmp_path / "e.parquet")])
    v = register_summarizer(store, "m", Summarizer(CFG))
    lmat.publish_snapshot(store, _watermark(0))
    lmat.publish_snapshot(store, _watermark(1))
    with pytest.raises(SummaryError, match="in order"):
        compute_summaries(store, v, 1)
    with pytest.raises(WatermarkError, match="Q >= P"):
        compute_summaries(store, v, 0, published_at=_watermark(0) - 1)
    assert summary_registry(store, v) == []


def _naive_tail(ev: pa.Table, user: int, t: int, w: int | None, n: int) -> list[int]:
    rows = [r for r in ev.to_pylist() if r["user_id"] == user and r["arrival_ts"] < t
            and (w is None or r["arrival_ts"] >= w)]
    rows.sort(key=lambda r: (r["event_ts"], r["event_id"]))
    return [r["item_id"] for r in rows][-n:] if n else []


def test_point_in_time_adversarial(built: tuple[Store, str, pa.Table]) -> None:
    """Requests before any summary, between snapshot k's publish (P_k) and its summary's
    (Q_k = P_k + 1 h), just at Q_k, and later: never a summary published after T."""
    store, version, ev = built
    tenants = parse_tenants({"tenants": [{
        "name": "vista", "columns": ["item_id", "action"], "max_len": 64,
        "summary": {"model": "vista", "tail_len": 5}}]})
    server = SummaryServer(store, tenants["vista"])
    users, ts = [], []
    for u in range(1, N_USERS + 1):
        for k in range(N_SNAPS):
            p = _watermark(k)
            ts += [p - 1, p, p + LAG // 2, p + LAG - 1, p + LAG, p + LAG + 1]
            users += [u] * 6
    users_a, ts_a = np.array(users), np.array(ts)
    got = server.serve(users_a, ts_a)
    stored = {(r["user_id"], r["snapshot_id"]): r
              for r in read_summary_rows(store, version).to_pylist()}
    for i, (u, t) in enumerate(zip(users, ts, strict=True)):
        # Newest k with Q_k <= t.
        ks = [k for k in range(N_SNAPS) if _watermark(k) + LAG <= t]
        want_s = ks[-1] if ks else -1
        assert got.snapshot_id[i] == want_s, (u, t)
        if want_s >= 0:
            assert got.published_at[i] <= t
        w = _watermark(want_s) if want_s >= 0 else None
        a = int(got.tail_lengths[:i].sum())
        tail = got.tail_values["item_id"][a:a + int(got.tail_lengths[i])].tolist()
        assert tail == _naive_tail(ev, u, t, w, 5), (u, t)
        head_users = [r for r in ev.to_pylist() if r["user_id"] == u and w is not None
                      and r["arrival_ts"] < w]
        assert bool(got.mask[i]) == bool(head_users)
        if not got.mask[i]:
            assert not got.summary[i].any()
        else:
            # The stored row of the newest snapshot <= S that touched the user, dequantized.
            row = stored[(u, max(k for k in range(want_s + 1) if (u, k) in stored))]
            q = np.frombuffer(row["tokens"], np.int8).reshape(CFG.k, CFG.d).astype(np.float32)
            sc = np.frombuffer(row["scales"], np.float32)
            np.testing.assert_array_equal(got.summary[i], q * sc[:, None])
            assert got.head_len[i] == row["head_len"]
    rep = check_served(store, version, users_a, ts_a, got)
    assert rep.ok, rep.problems
    assert rep.checked == len(users)
    # The check itself catches a summary from the future and a wrong checksum.
    bad = got.snapshot_id.copy()
    j = int(np.flatnonzero(got.mask & (got.snapshot_id < N_SNAPS - 1))[0])
    bad[j] += 1
    got.snapshot_id, keep = bad, got.snapshot_id
    assert check_served(store, version, users_a, ts_a, got).future >= 1
    got.snapshot_id = keep
    got.head_checksum[j] ^= 1
    assert check_served(store, version, users_a, ts_a, got).checksum_mismatches == 1


def test_late_summary_not_served_after_snapshot_publish(tmp_path: Path) -> None:
    """A snapshot published, its summaries not computed yet (and later computed with an old
    publish time refused): requests after P_k get k-1's summary and the tail since W_{k-1}."""
    store, ev, v = _small_store(tmp_path, 2)
    lmat.publish_snapshot(store, _watermark(0))
    compute_summaries(store, v, 0, published_at=_watermark(0))
    lmat.publish_snapshot(store, _watermark(1), published_at=_watermark(1))
    tenant = parse_tenants({"tenants": [{"name": "t", "columns": ["item_id"], "max_len": 200,
                                         "summary": {"model": "m", "tail_len": 100}}]})["t"]
    t = _watermark(1) + HOUR_US
    served = SummaryServer(store, tenant).serve(np.array([2]), np.array([t]))
    assert served.snapshot_id[0] == 0
    assert served.tail_values["item_id"].tolist() == _naive_tail(ev, 2, t, _watermark(0), 100)
    # Summaries of snapshot 1 published later, at Q_1 = t + 1: still not served at t.
    compute_summaries(store, v, 1, published_at=t + 1)
    served = SummaryServer(store, tenant).serve(np.array([2, 2]), np.array([t, t + 1]))
    assert served.snapshot_id.tolist() == [0, 1]


def test_forgotten_user_gets_zero_summary(tmp_path: Path) -> None:
    store, ev, v = _small_store(tmp_path, 3)
    for k in range(2):
        lmat.publish_snapshot(store, _watermark(k))
        compute_summaries(store, v, k, published_at=_watermark(k))
    assert 2 in read_summary_rows(store, v).column("user_id").to_pylist()
    lmat.forget_users(store, [2])
    assert 2 not in read_summary_rows(store, v).column("user_id").to_pylist()
    st = store.read_table("summary_state")
    assert 2 not in st.column("user_id").to_pylist()
    tenant = parse_tenants({"tenants": [{"name": "t", "columns": ["item_id"], "max_len": 8,
                                         "summary": {"model": "m", "tail_len": 4}}]})["t"]
    got = SummaryServer(store, tenant).serve(np.array([2, 1]), np.array([_watermark(3)] * 2))
    assert not got.mask[0] and not got.summary[0].any() and got.tail_lengths[0] == 0
    assert check_served(store, v, np.array([2, 1]), np.array([_watermark(3)] * 2), got).ok
    # The next snapshot recomputes the summaries of the users it touches from their heads.
    lmat.publish_snapshot(store, _watermark(2))
    compute_summaries(store, v, 2, published_at=_watermark(2))
    assert recompute_check(store, v, 2).ok


def test_pending_forget_is_served_nothing(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A forget killed after its tombstone (rows not deleted yet): serve() called directly
    gives the user no summary and no tail, as every reader hides a pending user."""
    from lmat_platform.store import deletion

    store, ev, v = _small_store(tmp_path, 3)
    lmat.publish_snapshot(store, _watermark(0))
    compute_summaries(store, v, 0, published_at=_watermark(0))
    tenant = parse_tenants({"tenants": [{"name": "t", "columns": ["item_id"], "max_len": 8,
                                         "summary": {"model": "m", "tail_len": 4}}]})["t"]
    server = SummaryServer(store, tenant)
    req = np.array([2, 1]), np.array([_watermark(3)] * 2)
    before = server.serve(*req)
    assert before.mask[0] and before.tail_lengths[0] > 0

    def killed(*a: object, **k: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(deletion, "_purge", killed)
    with pytest.raises(RuntimeError):
        lmat.forget_users(store, [2])
    assert deletion.pending_users(store).tolist() == [2]
    assert 2 in read_summary_rows(store, v).column("user_id").to_pylist()
    got = server.serve(*req)
    assert not got.mask[0] and not got.summary[0].any() and got.tail_lengths[0] == 0
    assert got.head_len[0] == 0 and got.head_checksum[0] == 0
    # Everyone else is served exactly as before.
    assert got.mask[1] == before.mask[1] and np.array_equal(got.summary[1], before.summary[1])
    assert got.tail_values["item_id"].tolist() == before.tail_values["item_id"][
        before.tail_lengths[0]:].tolist()


def test_loader_batches_carry_summaries(built: tuple[Store, str, pa.Table],
                                        tmp_path: Path) -> None:
    store, version, _ = built
    t = _watermark(N_SNAPS - 1) + 2 * LAG
    req = requests_table([{"request_id": i, "user_id": u, "request_ts": t - i * HOUR_US}
                          for i, u in enumerate(range(1, N_USERS + 1))])
    pq.write_table(req, str(tmp_path / "r.parquet"))
    lmat.write_thin(store, str(tmp_path / "r.parquet"), str(tmp_path / "thin"), path="examples")
    tenant = parse_tenants({"tenants": [{"name": "t", "columns": ["item_id", "action"],
                                         "max_len": 32,
                                         "summary": {"model": "vista", "tail_len": 3}}]})["t"]
    loader = lmat.SequenceLoader(store, str(tmp_path / "thin"), tenant=tenant, batch_size=4)
    server = SummaryServer(store, tenant)
    seen = 0
    for b in loader:
        assert b.summary is not None and b.summary.shape == (len(b), CFG.k, CFG.d)
        want = server.serve(b.user_id.numpy(), b.request_ts.numpy())
        np.testing.assert_array_equal(b.summary.numpy(), want.summary)
        np.testing.assert_array_equal(b.summary_mask.numpy(), want.mask)
        np.testing.assert_array_equal(b.lengths.numpy(), want.tail_lengths)
        np.testing.assert_array_equal(b.values["item_id"].numpy(), want.tail_values["item_id"])
        np.testing.assert_array_equal(b.summary_pointer["head_checksum"].numpy(),
                                      want.head_checksum)
        assert int(b.lengths.max()) <= 3
        b.validate()
        seen += len(b)
    assert seen == N_USERS


def test_storage_report(built: tuple[Store, str, pa.Table]) -> None:
    store, version, _ = built
    rep = storage_report(store, version)
    assert rep["snapshots_kept"] == N_SNAPS
    assert rep["summaries_rows"] == read_summary_rows(store, version).num_rows
    # int8 tokens: K * d bytes before compression; float32 scales K * 4.
    assert 0 < rep["summaries.tokens_bytes_per_row"] <= CFG.k * CFG.d + 64
    assert rep["summary_state_bytes_per_row"] > rep["summaries_bytes_per_row"]


def test_tenant_summary_declaration(tmp_path: Path) -> None:
    t = parse_tenants({"tenants": [{"name": "a", "columns": ["item_id"], "max_len": 8,
                                    "summary": {"model": "v", "tail_len": 16}}]})["a"]
    assert t.summary is not None and (t.summary.model, t.summary.tail_len) == ("v", 16)
    assert t.as_dict()["summary"] == {"model": "v", "tail_len": 16}
    for bad, msg in [({"model": "v"}, "tail_len"), ({"tail_len": 3}, "model"),
                     ({"model": "v", "tail_len": -1}, "tail_len"),
                     ({"model": "v", "tail_len": 2, "k": 1}, "unknown field 'k'"),
                     ("v", "mapping")]:
        with pytest.raises(TenantError, match=msg):
            parse_tenants({"tenants": [{"name": "a", "columns": ["item_id"], "max_len": 8,
                                        "summary": bad}]})
    with pytest.raises(SummaryError, match="no summarizer"):
        SummaryServer(lmat.init_store(str(tmp_path / "s")), t)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cli_summarize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tests.helpers import one_line_error, run_main

    store = lmat.init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64)
    pq.write_table(_events(4), str(tmp_path / "e.parquet"))
    lmat.ingest_files(store, [str(tmp_path / "e.parquet")])
    for k in range(2):
        lmat.publish_snapshot(store, _watermark(k))
    rc, out, err = run_main(capsys, ["summarize", store.root, "--model", "m"])
    assert rc == 2 and "no summarizer registered" in one_line_error(err) and out == ""
    v = register_summarizer(store, "m", Summarizer(CFG))
    rc, out, err = run_main(capsys, ["summarize", store.root, "--model", "m", "--check",
                                     "--publish-delay-minutes", "30"])
    assert rc == 0, err
    got = json.loads(out)
    assert got["version"] == v and [c["snapshot_id"] for c in got["computed"]] == [0, 1]
    assert got["check"]["ok"] and got["snapshots"] == 2
    assert [e.published_at for e in summary_registry(store, v)] == [
        _watermark(k) + 30 * 60_000_000 for k in range(2)]
    rc, out, _ = run_main(capsys, ["summarize", store.root, "--model", "m"])
    assert rc == 0 and json.loads(out)["computed"] == []


def test_snapshot_published_after_server_built(tmp_path: Path) -> None:
    """Events of a snapshot published after the server was pinned are read once (raw log),
    not twice (raw log and tier)."""
    store, ev, _ = _small_store(tmp_path, 5)
    lmat.publish_snapshot(store, _watermark(0))
    lmat.summaries.compute_pending(store, lmat.summaries.resolve_version(store, "m"),
                                   publish_delay_us=0)
    tenant = parse_tenants({"tenants": [{"name": "t", "columns": ["item_id"], "max_len": 500,
                                         "summary": {"model": "m", "tail_len": 500}}]})["t"]
    server = SummaryServer(store, tenant)
    lmat.publish_snapshot(store, _watermark(1))
    t = _watermark(1) + HOUR_US
    got = server.serve(np.array([2]), np.array([t]))
    assert got.snapshot_id[0] == 0
    assert got.tail_values["item_id"].tolist() == _naive_tail(ev, 2, t, _watermark(0), 500)


def test_tail_goes_through_the_tenant_projection(built: tuple[Store, str, pa.Table]) -> None:
    """The tail keeps the tenant's actions and window, then its last min(tail_len, max_len)."""
    store, _, ev = built
    tenant = parse_tenants({"tenants": [{
        "name": "p", "columns": ["item_id", "action"], "max_len": 3, "actions": [1, 2],
        "window_days": 0.25, "summary": {"model": "vista", "tail_len": 10}}]})["p"]
    t = _watermark(1) + LAG // 2  # summary of snapshot 0 served (Q_1 > t)
    users = np.arange(1, N_USERS + 1)
    got = SummaryServer(store, tenant).serve(users, np.full(N_USERS, t))
    pos = 0
    for i, u in enumerate(users.tolist()):
        rows = [r for r in ev.to_pylist() if r["user_id"] == u and r["arrival_ts"] < t
                and r["arrival_ts"] >= _watermark(0) and r["action"] in (1, 2)
                and r["event_ts"] >= t - 6 * HOUR_US]
        rows.sort(key=lambda r: (r["event_ts"], r["event_id"]))
        want = rows[-3:]
        n = int(got.tail_lengths[i])
        assert got.tail_values["item_id"][pos:pos + n].tolist() == [r["item_id"] for r in want]
        assert got.tail_values["action"][pos:pos + n].tolist() == [r["action"] for r in want]
        pos += n


def test_summary_batches_read_each_event_once(built: tuple[Store, str, pa.Table],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A summary tenant's batch reads each tier row group at most once and the raw log once
    (the loader checks pointers without reading events; the summary server reads the tails),
    and a request without a summary does not make the batch's other users read the tier rows
    their summaries cover: every row group read holds a row some request of the batch needs."""
    from lmat_platform.protocol import thin as thin_mod
    from lmat_platform.store import uih

    store, _, ev = built
    t_late = _watermark(N_SNAPS - 1) + 2 * LAG  # summary of the last snapshot served
    reqs = [{"request_id": u, "user_id": u, "request_ts": t_late}
            for u in range(1, N_USERS + 1)]
    # User 2 also asks before any summary is published: the whole of their tier is needed.
    reqs.append({"request_id": 100, "user_id": 2, "request_ts": _watermark(0) + LAG // 2})
    pq.write_table(requests_table(reqs), str(tmp_path / "r.parquet"))
    lmat.write_thin(store, str(tmp_path / "r.parquet"), str(tmp_path / "thin"), path="examples")
    tenant = parse_tenants({"tenants": [{"name": "once", "columns": ["item_id"], "max_len": 64,
                                         "summary": {"model": "vista", "tail_len": 64}}]})["once"]
    # Which (user, snapshot) rows the batch needs from the tier: after each request's summary.
    need = {(2, k) for k in range(N_SNAPS)}  # the request without a summary
    files = {f.path: f for f in uih.list_files(store.open_table("uih"))}
    reads: list[tuple[str, int]] = []
    raw_reads = []

    def rec_groups(store_: Store, f: uih.TierFile, groups: list[int], *a: object) -> pa.Table:
        reads.extend((f.path, g) for g in groups)
        return real_groups(store_, f, groups, *a)

    def rec_users(store_: Store, fs: list[uih.TierFile], users: np.ndarray,
                  cols: list[str]) -> list[pa.Table]:
        for f in fs:
            md = uih.file_metadata(store_, f.path)
            reads.extend((f.path, g) for g in uih.row_groups_for_users(md, users))
        return real_users(store_, fs, users, cols)

    def rec_raw(*a: object, **k: object) -> pa.Table:
        raw_reads.append(k.get("users"))
        return real_raw(*a, **k)

    real_groups, real_users, real_raw = (uih._read_row_groups, uih.read_user_row_groups,
                                         thin_mod.accepted_events)
    monkeypatch.setattr(uih, "_read_row_groups", rec_groups)
    monkeypatch.setattr(uih, "read_user_row_groups", rec_users)
    monkeypatch.setattr(thin_mod, "accepted_events", rec_raw)
    loader = lmat.SequenceLoader(store, str(tmp_path / "thin"), tenant=tenant,
                                 batch_size=len(reqs))
    batches = list(loader)
    assert len(batches) == 1 and len(batches[0]) == len(reqs)
    assert len(raw_reads) == 1, f"the raw log was read {len(raw_reads)} times for one batch"
    assert len(reads) == len(set(reads)), "a tier row group was read twice for one batch"
    for path, g in reads:
        got = pq.ParquetFile(f"{store.root}/uih/{path}").read_row_group(
            g, columns=["user_id", "snapshot_id"]).to_pylist()
        assert any((r["user_id"], r["snapshot_id"]) in need for r in got), (
            f"row group {g} of {files[path].path} holds no tier row the batch needs")
    # And what was served is the tail (all after the last summary but user 2's early request).
    b = batches[0]
    order = b.request_id.numpy().tolist()
    off = np.concatenate([[0], np.cumsum(b.lengths.numpy())])
    early = order.index(100)
    want = _naive_tail(ev, 2, _watermark(0) + LAG // 2, None, 64)
    assert b.values["item_id"][off[early]:off[early + 1]].tolist() == want
    assert not b.summary_mask[early] and b.summary_mask[order.index(2)]


def test_superseded_states_pruned_after_retention(tmp_path: Path) -> None:
    """A user's state rows older than their newest one go once the newer one's snapshot is
    older than the retention (kept before); extending and the recompute check still work, and
    vacuum prunes with the store's retention."""
    from lmat_platform.store.core import delta_dataset
    from lmat_platform.summaries import prune_states, superseded_states

    store = lmat.init_store(str(tmp_path / "s"), n_buckets=2, row_group_rows=64,
                            retention_hours=0)
    ev = _events(7)
    pq.write_table(ev, str(tmp_path / "e.parquet"))
    lmat.ingest_files(store, [str(tmp_path / "e.parquet")])
    v = register_summarizer(store, "m", Summarizer(CFG))
    for k in range(N_SNAPS - 1):
        lmat.publish_snapshot(store, _watermark(k))
        compute_summaries(store, v, k, published_at=_watermark(k))

    def state_keys() -> list[tuple[int, int]]:
        t = delta_dataset(store.open_table("summary_state")).to_table(
            columns=["user_id", "snapshot_id"])
        return sorted(zip(t.column("user_id").to_pylist(), t.column("snapshot_id").to_pylist(),
                          strict=True))

    before = state_keys()
    newest = {u: max(s for uu, s in before if uu == u) for u, _ in before}
    assert len(before) > len(newest)  # some users were touched by both snapshots
    reg = summary_registry(store, v)
    # Within the retention (an hour, measured from just after the last registration): kept.
    kept = prune_states(store, retention_hours=1, now=reg[-1].created_at + 1)
    assert kept["rows_dropped"] == 0 and state_keys() == before
    assert superseded_states(store, retention_hours=1, now=reg[-1].created_at + 1).num_rows == 0
    # Past it: exactly the superseded rows go, one row per user is left.
    got = prune_states(store, retention_hours=0)
    assert got["rows_dropped"] == len(before) - len(newest)
    assert state_keys() == sorted(newest.items())
    assert prune_states(store, retention_hours=0)["rows_dropped"] == 0  # idempotent
    rep = recompute_check(store, v, 0)  # states pruned: tokens still compared
    assert rep.ok and rep.users > 0, rep
    # The next snapshot extends the kept states and agrees with a fold from scratch.
    lmat.publish_snapshot(store, _watermark(N_SNAPS - 1))
    compute_summaries(store, v, N_SNAPS - 1, published_at=_watermark(N_SNAPS - 1))
    assert recompute_check(store, v, N_SNAPS - 1).ok
    # vacuum (the store's retention is 0 h) prunes what snapshot 2 superseded.
    lmat.vacuum(store)
    t = delta_dataset(store.open_table("summary_state")).to_table(columns=["user_id"])
    assert sorted(t.column("user_id").to_pylist()) == sorted(set(t.column("user_id").to_pylist()))
