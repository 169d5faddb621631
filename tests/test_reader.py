"""SequenceLoader and Batch (spec section 9, issue 4): exactly once, parity with materialize,
resume, pushdown, bad input."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from reader_fixtures import (
    ReaderStore,
    build_store,
    collect,
    copy_store,
    materialized,
    same,
    workers_from_the_second_batch,
    write_bad_thin,
)

import lmat_platform as lmat
from lmat_platform import synth
from lmat_platform.exceptions import TenantError, ThinTableError
from lmat_platform.reader import Batch, SequenceLoader, StoreUnreachableError, plan_units
from lmat_platform.reader.loader import assign_units
from lmat_platform.reader.prefetch import Prefetcher
from lmat_platform.reader.workers import slots_for
from lmat_platform.reconstruct import own_tails

TENANT = lmat.Tenant("ranking", ("item_id", "action", "dwell_ms", "event_ts"), 300)
ACTIONS = lmat.Tenant("retrieval", ("item_id",), 64, actions=(1, 2), window_days=1.5)


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> ReaderStore:
    return build_store(tmp_path_factory.mktemp("reader"))


@pytest.fixture(scope="module")
def reference(rs: ReaderStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for t in (TENANT, ACTIONS):
        path = str(tmp_path_factory.mktemp("mat") / f"{t.name}.parquet")
        lmat.materialize(rs.store, rs.thin, t, path)
        out[t.name] = materialized(path, t.columns)
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 3])
def test_every_request_exactly_once(rs: ReaderStore, reference: dict, num_workers: int,
                                    world_size: int) -> None:
    got: dict = {}
    for rank in range(world_size):
        loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=50,
                                num_workers=num_workers, shuffle=True, seed=3, rank=rank,
                                world_size=world_size, max_unit_rows=120)
        part = collect(list(loader))
        assert len(part) == loader.num_requests
        assert not part.keys() & got.keys(), "a request was yielded by two ranks"
        got.update(part)
    assert same(got, reference[TENANT.name])


@pytest.mark.parametrize("tenant", [TENANT, ACTIONS], ids=lambda t: t.name)
def test_sequences_equal_materialize(rs: ReaderStore, reference: dict, tenant: lmat.Tenant) -> None:
    loader = SequenceLoader(rs.store, rs.thin, tenant=tenant, batch_size=64, shuffle=False)
    batches = list(loader)
    assert same(collect(batches), reference[tenant.name])
    assert all(b.values["item_id"].dtype == torch.int64 for b in batches)
    assert set(batches[0].context) == {"label", "candidate_item_id", "position"}
    assert loader.bytes_read == sum(b.bytes_read for b in batches) > 0
    assert len(loader) == len(batches)


def test_thin_files_in_any_row_order_read_the_same(rs: ReaderStore, reference: dict,
                                                    tmp_path: Path) -> None:
    """lmat writes each thin file in (user, time, request) order; a reader merges a bucket's
    files in that order and cuts split buckets as zero-copy slices. A file written in another
    order is sorted when read (so that slices stay user-contiguous); either way every request
    comes once, as materialized."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from lmat_platform.store.core import delta_dataset

    dt = DeltaTable(rs.thin)
    t = delta_dataset(dt).to_table()
    t = t.take(pa.array(np.random.default_rng(5).permutation(t.num_rows)))
    out = str(tmp_path / "shuffled")
    half = t.num_rows // 2  # two files per bucket, both out of order
    write_deltalake(out, t.slice(0, half), partition_by=["bucket"],
                    description=dt.metadata().description)
    write_deltalake(out, t.slice(half), mode="append")
    for unit_rows in (None, 40):
        loader = SequenceLoader(rs.store, out, tenant=TENANT, batch_size=64,
                                max_unit_rows=unit_rows)
        assert same(collect(list(loader)), reference[TENANT.name])


def test_tails_stored_out_of_order_read_the_same(rs: ReaderStore, reference: dict,
                                                 tmp_path: Path) -> None:
    """lmat stores each tail in (event_ts, event_id) order, which the kernel uses in place. A
    writer that stores them in another order is detected (each row's tail is checked once
    per bucket) and its tails are ordered before merging: the same sequences."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake

    from lmat_platform.protocol.thin import TAIL_PREFIX
    from lmat_platform.reconstruct import ThinRows, event_columns
    from lmat_platform.store.core import delta_dataset

    dt = DeltaTable(rs.thin)
    store_schema = lmat.ReadContext.build(rs.store, TENANT).schema
    # The older format (each row's own tail in its lists), as another writer might store it.
    t = own_tails(delta_dataset(dt).to_table(), store_schema)
    cols = {}
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        if name.startswith(TAIL_PREFIX) and pa.types.is_list(col.type):
            # Reverse every row's tail: flatten, reverse within each list, rebuild.
            off = col.offsets.to_numpy()
            vals = col.flatten()
            idx = np.concatenate([np.arange(off[i + 1] - 1, off[i] - 1, -1)
                                  for i in range(len(col))] or [np.zeros(0, np.int64)])
            col = pa.ListArray.from_arrays(pa.array(off - off[0], pa.int32()),
                                           vals.take(pa.array(idx, pa.int64())),
                                           mask=pc.is_null(col))
        cols[name] = col
    rev = pa.table(cols)
    assert int(pc.max(rev.column("tail_len")).as_py()) > 1, "some tail has two events"
    assert not ThinRows.from_table(rev, event_columns(TENANT), store_schema).tails_sorted
    out = str(tmp_path / "reversed")
    write_deltalake(out, rev, partition_by=["bucket"], description=dt.metadata().description)
    for tenant in (TENANT, ACTIONS):
        for unit_rows in (None, 40):
            loader = SequenceLoader(rs.store, out, tenant=tenant, batch_size=64,
                                    max_unit_rows=unit_rows)
            assert same(collect(list(loader)), reference[tenant.name])
    path = str(tmp_path / "m.parquet")
    lmat.materialize(rs.store, out, TENANT, path)
    assert same(materialized(path, TENANT.columns), reference[TENANT.name])


def test_thin_tables_of_the_older_format_read_the_same(rs: ReaderStore, reference: dict,
                                                       tmp_path: Path) -> None:
    """Thin tables written before tails were stored once per user (each row its own tail)
    stay readable: the same sequences from the loader and from materialize, also with both
    formats in one table."""
    from deltalake import DeltaTable, write_deltalake

    from lmat_platform.protocol.thin import TAIL_BLOCK
    from lmat_platform.store.core import delta_dataset

    dt = DeltaTable(rs.thin)
    t = delta_dataset(dt).to_table()
    assert t.column(TAIL_BLOCK).null_count < t.num_rows, "the fixture writes the new format"
    old = own_tails(t, lmat.ReadContext.build(rs.store, TENANT).schema)
    out = str(tmp_path / "old")
    write_deltalake(out, old, partition_by=["bucket"], description=dt.metadata().description)
    mixed = str(tmp_path / "mixed")
    users = t.column("user_id").to_numpy()
    odd = pa.array(users % 2 == 1)
    write_deltalake(mixed, old.filter(odd), partition_by=["bucket"],
                    description=dt.metadata().description)
    write_deltalake(mixed, t.filter(pc.invert(odd)), mode="append", schema_mode="merge")
    for thin in (out, mixed):
        for tenant in (TENANT, ACTIONS):
            loader = SequenceLoader(rs.store, thin, tenant=tenant, batch_size=64,
                                    max_unit_rows=40)
            assert same(collect(list(loader)), reference[tenant.name])
        path = str(tmp_path / "m.parquet")
        lmat.materialize(rs.store, thin, TENANT, path)
        assert same(materialized(path, TENANT.columns), reference[TENANT.name])


def test_shuffle_is_deterministic_by_seed_and_epoch(rs: ReaderStore) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        loader = SequenceLoader(rs.store, rs.thin, tenant=ACTIONS, batch_size=100, shuffle=True,
                                seed=seed, max_unit_rows=200, shuffle_buffer=400)
        loader.set_epoch(epoch)
        return [r for b in loader for r in b.request_id.tolist()]

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    assert sorted(a) == sorted(order(0, 1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_identical_remainder(rs: ReaderStore, num_workers: int) -> None:
    kw = dict(tenant=ACTIONS, batch_size=40, num_workers=num_workers, shuffle=True, seed=7,
              max_unit_rows=150, shuffle_buffer=300)
    full = SequenceLoader(rs.store, rs.thin, **kw)  # type: ignore[arg-type]
    full.set_epoch(2)
    want = [(b.request_id.tolist(), b.values["item_id"].tolist()) for b in full]

    first = SequenceLoader(rs.store, rs.thin, **kw)  # type: ignore[arg-type]
    first.set_epoch(2)
    it = iter(first)
    k = 7
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    del it
    assert [b.request_id.tolist() for b in head] == [w[0] for w in want[:k]]

    resumed = SequenceLoader(rs.store, rs.thin, **kw)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    rest = [(b.request_id.tolist(), b.values["item_id"].tolist()) for b in resumed]
    assert rest == want[k:]

    other = SequenceLoader(rs.store, rs.thin, **{**kw, "batch_size": 41})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_thin_bytes_count_each_file_once_however_units_are_dealt(rs: ReaderStore) -> None:
    """A split bucket's slices may go to different consumers (or Ray actors), each reading the
    bucket's thin files: each unit counts its rows' share, so a pass counts every file once."""
    whole = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=64)
    list(whole)
    split = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=64, num_workers=2,
                           max_unit_rows=40)
    first, second = split.plan()
    assert {u.bucket for u in first} & {u.bucket for u in second}, \
        "some bucket's slices go to both consumers"
    list(split)
    assert split.thin_bytes_read == whole.thin_bytes_read > 0


def test_bytes_read_fall_as_max_len_falls(tmp_path: Path) -> None:
    # Few, heavy users (the heaviest with ~20,000 events) in row groups of 128 rows.
    cfg = synth.WorkloadConfig(seed=2, n_users=12, days=2, events_per_day=30000,
                               requests_per_day=60)
    heavy = build_store(tmp_path, n_buckets=2, row_group_rows=128, cfg=cfg)
    read = {}
    for L in (64, 512, 4096, 16384):
        t = lmat.Tenant(f"l{L}", ("item_id", "action"), L)
        loader = SequenceLoader(heavy.store, heavy.thin, tenant=t, batch_size=512)
        sum(len(b) for b in loader)
        read[L] = loader.bytes_read - loader.thin_bytes_read  # the UIH tier's share
    assert read[64] < read[512] < read[4096] < read[16384], read
    assert read[64] < read[16384] / 4, read


def test_unknown_tenant_column(rs: ReaderStore) -> None:
    bad = lmat.Tenant("bad", ("item_id", "no_such_column"), 10)
    with pytest.raises(TenantError, match="no_such_column"):
        SequenceLoader(rs.store, rs.thin, tenant=bad)


def test_thin_table_with_nonexistent_snapshots(rs: ReaderStore, tmp_path: Path) -> None:
    out = str(tmp_path / "bad_thin")
    write_bad_thin(rs, out)
    with pytest.raises(ThinTableError, match="does not exist"):
        SequenceLoader(rs.store, out, tenant=TENANT)


def test_thin_table_of_another_store(rs: ReaderStore, tmp_path: Path) -> None:
    other = lmat.init_store(str(tmp_path / "other"))
    with pytest.raises(ThinTableError, match="belongs to store"):
        SequenceLoader(other, rs.thin, tenant=lmat.Tenant("ids", ("item_id",), 8))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_store_removed_mid_epoch_raises_not_hangs(rs: ReaderStore, tmp_path: Path,
                                                  num_workers: int) -> None:
    cp = copy_store(rs, tmp_path)
    loader = SequenceLoader(cp.store, cp.thin, tenant=TENANT, batch_size=20, prefetch=1,
                            num_workers=num_workers, max_unit_rows=20, timeout_s=30)
    it = iter(loader)
    next(it)
    shutil.rmtree(Path(cp.store) / "uih")
    t0 = time.monotonic()
    with pytest.raises(StoreUnreachableError, match="store") as e:
        for _ in it:
            pass
    assert isinstance(e.value, OSError) and isinstance(e.value, lmat.LmatError)
    assert time.monotonic() - t0 < 30


def test_plan_covers_every_row_once() -> None:
    rows = {0: 1000, 1: 10, 2: 0, 5: 333}
    units = plan_units(rows, max_unit_rows=300, min_units=9)
    assert len(units) >= 9
    for b, n in rows.items():
        us = [u for u in units if u.bucket == b]
        assert sum(u.rows for u in us) == n
        assert [u.bounds for u in us] == sorted(u.bounds for u in us)
    dealt = assign_units(units, 4, seed=1, epoch=0, shuffle=True)
    key = lambda u: (u.bucket, u.part)  # noqa: E731
    assert sorted((u for c in dealt for u in c), key=key) == sorted(units, key=key)
    loads = [sum(u.rows for u in c) for c in dealt]
    assert max(loads) - min(loads) <= max(u.rows for u in units)
    # Shuffled, a consumer still meets each bucket's slices one after another (one decode).
    for c in dealt:
        runs = [u.bucket for k, u in enumerate(c) if k == 0 or u.bucket != c[k - 1].bucket]
        assert len(runs) == len(set(runs)), runs
    orders = {tuple((u.bucket, u.part) for u in assign_units(units, 1, seed=1, epoch=e,
                                                              shuffle=True)[0])
              for e in range(10)}
    assert len(orders) > 1, "epochs shuffle differently"


def _batch() -> Batch:
    return Batch(
        request_id=torch.tensor([11, 12, 13]),
        lengths=torch.tensor([2, 0, 3]),
        values={"item": torch.tensor([7, 9, 4, 4, 8]), "w": torch.tensor([1.0, 2, 3, 4, 5])},
        context={"label": torch.tensor([1, 0, 1])},
    )


def test_batch_views() -> None:
    b = _batch()
    b.validate()
    assert b.offsets().tolist() == [0, 2, 2, 5]
    assert b.padded("item").tolist() == [[7, 9, 0], [0, 0, 0], [4, 4, 8]]
    assert b.padded("item", side="left").tolist() == [[0, 7, 9], [0, 0, 0], [4, 4, 8]]
    # A cut keeps the newest events.
    assert b.padded("item", max_len=2, pad_value=-1).tolist() == [[7, 9], [-1, -1], [4, 8]]
    assert b.padded("item", max_len=2, side="left").tolist() == [[7, 9], [0, 0], [4, 8]]
    moved = b.to("cpu", non_blocking=True)
    assert torch.equal(moved.values["w"], b.values["w"])
    assert b.pin_memory().lengths.tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="Sum of lengths"):
        Batch(b.request_id, torch.tensor([2, 0, 2]), b.values).validate()


def test_to_kjt_without_torchrec_is_a_clear_import_error() -> None:
    try:
        import torchrec  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchrec"):
            _batch().to_kjt()
    else:
        kjt = _batch().to_kjt()
        assert kjt.keys() == ["item"]
        assert kjt.values().tolist() == [7, 9, 4, 4, 8]


def test_prefetcher_propagates_errors_and_stops() -> None:
    def boom():
        yield 1
        raise KeyError("original message")

    p = Prefetcher(boom, depth=1)
    assert next(p) == 1
    with pytest.raises(KeyError, match="original message"):
        next(p)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    q = Prefetcher(endless, depth=2)
    assert [next(q) for _ in range(3)] == [0, 1, 2]
    q.close()
    assert not q._thread.is_alive()
    with pytest.raises(StopIteration):
        next(q)


def test_read_context_is_derived_once_per_version_and_follows_every_table(
    rs: ReaderStore, tmp_path: Path
) -> None:
    """Building a loader per pass lists the logs but derives nothing twice; a commit to any
    table the reader depends on gives a new state (what prepared units are keyed by)."""
    from lmat_platform.reconstruct import ReadContext
    from lmat_platform.store import publish_snapshot

    rs2 = copy_store(rs, tmp_path)
    c1 = ReadContext.build(rs2.store, TENANT)
    c2 = ReadContext.build(rs2.store, TENANT)
    assert c1.state is not None and c1.state == c2.state
    assert c1.files is c2.files and c1.published_at is c2.published_at
    last = int(c1.watermarks[-1])
    publish_snapshot(rs2.store, last + 1, published_at=int(c1.published_at[-1]) + 1)
    c3 = ReadContext.build(rs2.store, TENANT)
    assert c3.state != c1.state and len(c3.watermarks) == len(c1.watermarks) + 1
    user = 3
    lmat.forget_users(rs2.store, [user])
    c4 = ReadContext.build(rs2.store, TENANT)
    assert c4.state != c3.state and user in c4.forgotten.tolist()


def test_prepared_units_are_kept_per_rows_and_store_state(rs: ReaderStore, tmp_path: Path) -> None:
    from dataclasses import replace

    from deltalake import DeltaTable

    from lmat_platform.reconstruct import (
        ReadContext,
        ThinRows,
        event_columns,
        plan_unit,
        prepare_unit,
        reconstruct_bucket,
    )
    from lmat_platform.store import publish_snapshot
    from lmat_platform.store.core import delta_dataset

    rs2 = copy_store(rs, tmp_path)
    ctx = ReadContext.build(rs2.store, TENANT)
    t = delta_dataset(DeltaTable(rs2.thin)).to_table()
    b = t.column("bucket")[0].as_py()
    rows = t.filter(t.column("bucket").to_numpy() == b).sort_by(
        [("user_id", "ascending"), ("request_ts", "ascending"), ("request_id", "ascending")])
    thin = ThinRows.from_table(rows, event_columns(TENANT), ctx.schema)

    def never() -> ThinRows:
        raise AssertionError("the rows are not needed again")

    p1 = prepare_unit(ctx, b, thin, key=("rows",))
    assert prepare_unit(ctx, b, never, key=("rows",)) is p1
    want = reconstruct_bucket(ctx, b, thin).to_table()
    assert plan_unit(p1).to_table().equals(want)
    # A new store state, another tenant or no key: prepared again.
    publish_snapshot(rs2.store, int(ctx.watermarks[-1]) + 1,
                     published_at=int(ctx.published_at[-1]) + 1)
    ctx2 = ReadContext.build(rs2.store, TENANT)
    assert prepare_unit(ctx2, b, thin, key=("rows",)) is not p1
    assert prepare_unit(replace(ctx, tenant=ACTIONS), b, thin, key=("rows",)) is not p1
    assert prepare_unit(replace(ctx, state=None), b, thin, key=("rows",)) is not p1
    assert prepare_unit(ctx, b, thin) is not p1


def test_shared_tails_are_served_per_request_in_event_order() -> None:
    """Thin format 2 by hand: one user's events stored once (arrival order, a late event among
    them), three requests pointing at runs of them. Each request gets its run in
    (event_ts, event_id) order; runs already in order are zero-copy spans of the stored events;
    a pointer at a row that is not there, or past the stored events, is refused by name."""
    from lmat_platform.protocol.thin import TAIL_BLOCK, TAIL_START
    from lmat_platform.reconstruct import ThinRows

    schema = pa.schema([("event_ts", pa.int64()), ("event_id", pa.int64()),
                        ("item_id", pa.int64())])
    # arrival order: e1 (ts 10), e2 (ts 5, late), e3 (ts 20)
    ts, ids, items = [10, 5, 20], [1, 2, 3], [100, 200, 300]

    def table(block: list[int], start: list[int], lens: list[int]) -> pa.Table:
        lst = pa.list_(pa.int64())
        return pa.table({
            "request_id": pa.array([7, 8, 9], pa.int64()),
            "user_id": pa.array([1, 1, 1], pa.int64()),
            "tail_len": pa.array(lens, pa.int32()),
            TAIL_BLOCK: pa.array(block, pa.int64()),
            TAIL_START: pa.array(start, pa.int32()),
            "tail_event_ts": pa.array([ts, [], []], lst),
            "tail_event_id": pa.array([ids, [], []], lst),
            "tail_item_id": pa.array([items, [], []], lst),
        })

    thin = ThinRows.from_table(table([7, 7, 7], [0, 0, 1], [1, 2, 2]),
                               ["event_ts", "event_id", "item_id"], schema)
    assert thin.tails_sorted and thin.tail_events == 5
    got = [thin.tails["item_id"].to_numpy()[a:b].tolist()
           for a, b in zip(thin.t_start, thin.t_end, strict=True)]
    assert got == [[100], [200, 100], [200, 300]]
    assert thin.t_start[0] == 0 and thin.t_start[2] == 1  # spans of the stored events
    # 3 stored + the user's events sorted once, which request 8's events are consecutive in
    assert len(thin.tails["item_id"]) == 6 and thin.t_start[1] == 3
    part = thin.slice(1, 3)
    assert [part.tails["item_id"].to_numpy()[a:b].tolist()
            for a, b in zip(part.t_start, part.t_end, strict=True)] == got[1:]
    with pytest.raises(ThinTableError, match="request 9: .*request 6"):
        ThinRows.from_table(table([7, 7, 6], [0, 0, 1], [1, 2, 2]),
                            ["event_ts", "event_id", "item_id"], schema)
    with pytest.raises(ThinTableError, match="request 9: its tail points at 3 events from 1"):
        ThinRows.from_table(table([7, 7, 7], [0, 0, 1], [1, 2, 3]),
                            ["event_ts", "event_id", "item_id"], schema)


def test_workers_persist_across_passes_and_reuse_shared_slots(rs: ReaderStore,
                                                              reference: dict) -> None:
    """num_workers=2: the same worker processes serve every pass (also one abandoned part way),
    batches arrive in a few shared-memory slots reused once the consumer drops them, every
    pass yields every request once, and close() stops the workers."""
    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=16, num_workers=2,
                            shuffle=True, seed=2, max_unit_rows=60)
    first = collect(list(loader))
    assert same(first, reference[TENANT.name])
    loader._started()  # on a busy machine the whole first pass may be made before they are up
    pool = loader._pool
    assert pool is not None
    pids = [p.pid for p in pool.procs]
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        for k, _ in enumerate(loader):  # abandoned part way
            if k == 3:
                break
        loader.set_epoch(epoch)
        ptrs: set[int] = set()
        got: dict = {}
        n = 0
        for b in loader:  # each batch dropped before the next
            got.update(collect([b]))
            ptrs.add(b.values["item_id"].untyped_storage().data_ptr())
            n += 1
        assert same(got, reference[TENANT.name])
        assert loader._pool is pool and [p.pid for p in pool.procs] == pids
        # slots reused, not one buffer a batch
        assert len(ptrs) <= 2 * slots_for(loader.prefetch) < n, (len(ptrs), n)
    loader.close()
    assert loader._pool is None and not any(p.is_alive() for p in pool.procs)


def test_units_dealt_by_bucket_and_the_same_every_epoch() -> None:
    """A bucket's slices go to one consumer where balance allows, and the dealing does not
    change with the epoch (a persistent worker reads the same buckets every pass)."""
    rows = {b: 500 + 37 * b for b in range(6)}
    units = plan_units(rows, max_unit_rows=200, min_units=2)
    dealt = [assign_units(units, 2, seed=0, epoch=e, shuffle=True) for e in range(4)]
    owners = [{u.bucket: c for c, us in enumerate(d) for u in us} for d in dealt]
    assert all(o == owners[0] for o in owners)
    for d in dealt:
        buckets = [{u.bucket for u in us} for us in d]
        assert len(buckets[0] & buckets[1]) <= 1, buckets  # at most the one bucket balance cuts
        loads = [sum(u.rows for u in us) for us in d]
        assert max(loads) - min(loads) <= max(u.rows for u in units)
    assert [[(u.bucket, u.part) for u in us] for us in dealt[0]] != \
        [[(u.bucket, u.part) for u in us] for us in dealt[1]]


def test_cache_off_passes_read_the_same(rs: ReaderStore, reference: dict) -> None:
    """With the decoded cache off (LMAT_DECODE_CACHE_MB=0) every pass decodes the thin rows
    and tier row groups again, and yields the same sequences, pass after pass."""
    from lmat_platform.store.cache import cache, configure

    budget = cache().max_bytes / (1 << 20)
    configure(0)
    try:
        loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=64,
                                max_unit_rows=50)
        for _ in range(2):
            assert same(collect(list(loader)), reference[TENANT.name])
        assert cache().stats()["entries"] == 0
    finally:
        configure(budget)


def test_short_tenant_keeps_only_the_tail_events_it_can_use(rs: ReaderStore,
                                                            tmp_path: Path) -> None:
    """A tenant without an action filter never reaches further back than its last max_len
    events, so a request's tail that must be copied into (event_ts, event_id) order keeps
    only its last max_len: fewer events decoded, the same sequences as materialize (which
    keeps them all)."""
    from lmat_platform.reader.loader import _thin_bucket, _thin_dataset, tail_limit
    from lmat_platform.reconstruct import event_columns

    short = lmat.Tenant("short", ("item_id", "action"), 3)
    path = str(tmp_path / "short.parquet")
    lmat.materialize(rs.store, rs.thin, short, path)
    want = materialized(path, short.columns)
    for unit_rows in (None, 40):
        loader = SequenceLoader(rs.store, rs.thin, tenant=short, batch_size=32,
                                max_unit_rows=unit_rows)
        assert same(collect(list(loader)), want)
    assert tail_limit(short) == 3 and tail_limit(ACTIONS) is None
    ds, frags = _thin_dataset(loader.thin_uri, loader.info.version)
    kept = {lim: sum(len(_thin_bucket(fl, ds.schema, loader.thin_columns, event_columns(short),
                                      loader.ctx.schema, lim).tails["item_id"])
                     for fl in frags.values()) for lim in (None, 3)}
    assert kept[3] < kept[None], kept


def test_workers_start_the_expected_next_pass_early(rs: ReaderStore, reference: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With persistent workers each pass sends the next one ahead (the next epoch after
    set_epoch, the same plans without shuffle): workers begin it as soon as they finish, and
    the next pass takes it over when it is the one asked for. A wrong guess is cancelled:
    the pass asked for is served, in the order a fresh loader gives it, every request once."""
    def order(batches: list[Batch]) -> list[int]:
        return [int(r) for b in batches for r in b.request_id]

    workers_from_the_second_batch(monkeypatch)  # the first pass's workers start in it
    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=40, num_workers=2,
                            shuffle=True, seed=4, max_unit_rows=60)
    loader.set_epoch(0)
    assert same(collect(list(loader)), reference[TENANT.name])
    pool = loader._pool
    assert pool is not None and pool.ahead is not None and pool.ahead[0][0] == 1
    sent = pool.ahead[1]
    loader.set_epoch(1)
    got = list(loader)
    assert pool.current.value == sent, "the pass sent ahead was taken over"
    fresh = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=40, num_workers=2,
                           shuffle=True, seed=4, max_unit_rows=60)
    fresh.set_epoch(1)
    assert order(got) == order(list(fresh))
    loader.set_epoch(5)  # not the epoch guessed (2): that pass is dropped
    got = list(loader)
    assert pool.current.value == pool.pass_id - 1 > sent + 1
    fresh.set_epoch(5)
    assert order(got) == order(list(fresh))
    assert same(collect(got), reference[TENANT.name])
    loader.close()
    fresh.close()


def test_a_failed_pass_never_frees_the_slot_of_a_batch_already_sent() -> None:
    """A worker whose pass fails before its first batch (as a pass sent ahead may, right
    after the previous pass's last batch went out) frees only a slot it has not sent: the
    previous batch's slot stays taken until the consumer drops it, so it is not overwritten
    under a batch the consumer still holds."""
    import queue
    import threading
    from types import SimpleNamespace

    from lmat_platform.reader.workers import (
        DONE,
        ERROR,
        MAX_SLOTS,
        SLOT_PICKLED,
        header,
        worker_loop,
    )

    class Out:  # the worker's channel to the main process, kept here
        def __init__(self) -> None:
            self.msgs: list[bytes] = []

        def owner_alive(self) -> bool:
            return True

        def send(self, msg: bytes, live) -> bool:  # type: ignore[no-untyped-def]
            self.msgs.append(msg)
            return True

    def run(spec: str, alloc):  # type: ignore[no-untyped-def]
        if spec == "fail":
            raise RuntimeError("the next pass cannot start")
        (vals,) = alloc([(4, np.dtype(np.int64))])
        vals[:] = 7
        yield 4, Batch(request_id=torch.arange(2), lengths=torch.tensor([2, 2]),
                       values={"item_id": torch.from_numpy(vals)})

    tasks: queue.Queue = queue.Queue()
    out = Out()
    stop = threading.Event()
    current = SimpleNamespace(value=1)
    flags = torch.zeros(MAX_SLOTS, dtype=torch.int8)
    tasks.put((1, "ok"))
    tasks.put((2, "fail"))  # sent ahead: live while pass 1 is current
    tasks.put(None)
    worker_loop(0, tasks, out, stop, current, flags, run)  # type: ignore[arg-type]
    assert [m[0] for m in out.msgs] == [SLOT_PICKLED, DONE, ERROR]
    slot = header(out.msgs[0])[3]
    assert int(flags[slot]) == 1, "the sent batch's slot was freed by the failed pass"
