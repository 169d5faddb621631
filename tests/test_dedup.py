"""Deduplicated batches (RecD, ``SequenceLoader(dedup=True)``): every batch expands exactly to
the plain batch, on random workloads and tenants, and carries fewer values where requests share
a history."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmat_platform import synth
from lmat_platform.reader import Batch, SequenceLoader
from lmat_platform.reader.dedup import unique_rows
from lmat_platform.reconstruct import SegmentPlan
from lmat_platform.tenants import Tenant
from tests.reader_fixtures import ReaderStore, build_store, collect


@pytest.fixture(scope="module", params=[7, pytest.param(11, marks=pytest.mark.slow)])
def random_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> ReaderStore:
    """Random workloads (streaming rows for two days, batch rows for the third); the second
    one in the slow run."""
    seed = int(request.param)
    cfg = synth.WorkloadConfig(seed=seed, n_users=25, days=3, events_per_day=1500,
                               requests_per_day=200)
    return build_store(tmp_path_factory.mktemp(f"dedup-{seed}"), n_buckets=3, cfg=cfg)


def assert_same(plain: Batch, dedup: Batch) -> None:
    dedup.validate()
    e = dedup.expand()
    e.validate()
    assert e.inverse_indices is None
    assert torch.equal(plain.request_id, e.request_id)
    assert torch.equal(plain.lengths, e.lengths)
    assert plain.values.keys() == e.values.keys()
    for c in plain.values:
        assert plain.values[c].dtype == e.values[c].dtype
        assert torch.equal(plain.values[c], e.values[c]), c
    for c in plain.context:
        assert torch.equal(plain.context[c], dedup.context[c])
    c = next(iter(plain.values))
    assert torch.equal(plain.padded(c, side="left"), dedup.padded(c, side="left"))
    assert dedup.num_sequences <= len(dedup)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    max_len=st.sampled_from([1, 3, 16, 200, 5000]),
    actions=st.sampled_from([None, (1,), (1, 2)]),
    window_days=st.sampled_from([None, 0.05, 1.0]),
    batch_size=st.integers(1, 97),
    shuffle=st.booleans(),
    unit_rows=st.sampled_from([None, 37]),
)
def test_dedup_batches_expand_to_the_plain_batches(
    random_store: ReaderStore, max_len: int, actions: tuple[int, ...] | None,
    window_days: float | None, batch_size: int, shuffle: bool, unit_rows: int | None,
) -> None:
    t = Tenant("t", ("item_id", "event_ts", "dwell_ms", "action"), max_len, actions=actions,
               window_days=window_days)
    kw = dict(tenant=t, batch_size=batch_size, shuffle=shuffle, seed=5,
              max_unit_rows=unit_rows, shuffle_buffer=80 if shuffle else None)
    plain = list(SequenceLoader(random_store.store, random_store.thin, **kw))  # type: ignore[arg-type]
    dedup = list(SequenceLoader(random_store.store, random_store.thin, dedup=True, **kw))  # type: ignore[arg-type]
    assert len(plain) == len(dedup)
    for a, b in zip(plain, dedup, strict=True):
        assert_same(a, b)
    assert sum(len(b) for b in dedup) == sum(len(b) for b in plain)


def test_dedup_moves_fewer_bytes_where_requests_share_histories(random_store: ReaderStore) -> None:
    # One batch per bucket in user order: a user's consecutive requests with nothing new
    # between them share one sequence.
    t = Tenant("t", ("item_id", "action"), 50)
    plain = list(SequenceLoader(random_store.store, random_store.thin, tenant=t, batch_size=4096))
    dedup = list(SequenceLoader(random_store.store, random_store.thin, tenant=t, batch_size=4096,
                                dedup=True))
    assert sum(b.num_sequences for b in dedup) < 0.9 * sum(len(b) for b in dedup)
    assert sum(b.nbytes for b in dedup) < sum(b.nbytes for b in plain)


def _plan(segs: list[list[tuple[int, int]]], n_head: int, tail_id: list[int]) -> SegmentPlan:
    off = np.cumsum([0] + [len(s) for s in segs]).astype(np.int64)
    flat = [p for s in segs for p in s] or [(0, 0)]
    s0 = np.array([a for a, _ in flat], dtype=np.int64)
    s1 = np.array([b for _, b in flat], dtype=np.int64)
    head = {"x": np.arange(n_head, dtype=np.int64) * 10}
    tail = {"x": np.array(tail_id, dtype=np.int64)}
    return SegmentPlan(off, s0, s1, head, tail, np.array(tail_id, dtype=np.int64))


def test_unique_rows_compare_events_not_positions() -> None:
    # Head rows 0..9; tail positions 10.. hold events 100, 101, 100, 101, 102 (copies).
    plan = _plan([
        [(2, 5), (10, 12)],          # 0: head 2..4, events 100 101
        [(2, 4), (4, 5), (12, 14)],  # 1: the same head split in two, the copies of 100 101
        [(2, 5), (10, 11)],          # 2: shorter tail
        [(2, 5), (10, 12)],          # 3: as row 0, but another user
        [(2, 5), (12, 13), (11, 12)],  # 4: 100 101 again, from two copies
        [(3, 3), (2, 5), (10, 12)],  # 5: an empty segment, then as row 0
        [],                          # 6: empty
        [(0, 0)],                    # 7: empty
    ], 10, [100, 101, 100, 101, 102])
    users = np.array([1, 1, 1, 2, 1, 1, 1, 1])
    keep, inv = unique_rows(plan, np.arange(8), users)
    assert keep.tolist() == [0, 2, 3, 6]
    assert inv.tolist() == [0, 0, 1, 2, 0, 0, 3, 3]
    # A subset of rows, in another order.
    keep, inv = unique_rows(plan, np.array([2, 1, 0]), users[[2, 1, 0]])
    assert keep.tolist() == [0, 1] and inv.tolist() == [0, 1, 1]


def test_unique_rows_without_event_ids_compare_positions() -> None:
    plan = _plan([[(2, 5), (10, 12)], [(12, 14), (2, 5)], [(2, 5), (10, 12)]], 10,
                 [100, 101, 100, 101])
    plan.tail_id = None
    keep, inv = unique_rows(plan, np.arange(3), np.array([1, 1, 1]))
    assert keep.tolist() == [0, 1] and inv.tolist() == [0, 1, 0]


def test_expand_validate_and_padded_of_a_handmade_batch() -> None:
    b = Batch(request_id=torch.tensor([11, 12, 13, 14]), lengths=torch.tensor([2, 0, 3]),
              values={"item": torch.tensor([7, 9, 4, 4, 8])},
              inverse_indices=torch.tensor([0, 0, 1, 2]))
    b.validate()
    e = b.expand()
    assert e.lengths.tolist() == [2, 2, 0, 3]
    assert e.values["item"].tolist() == [7, 9, 7, 9, 4, 4, 8]
    assert b.padded("item").tolist() == [[7, 9, 0], [7, 9, 0], [0, 0, 0], [4, 4, 8]]
    assert b.offsets().tolist() == [0, 2, 2, 5]
    bad = Batch(request_id=torch.tensor([1, 2]), lengths=torch.tensor([1]),
                values={"item": torch.tensor([5])}, inverse_indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="inverse_indices"):
        bad.validate()
    assert b.nbytes == 8 * (4 + 3 + 5 + 4)


def test_dedup_refuses_a_summary_tenant(random_store: ReaderStore) -> None:
    from lmat_platform.tenants import SummarySpec

    t = Tenant("s", ("item_id",), 8, summary=SummarySpec("m", 4))
    with pytest.raises(ValueError, match="dedup"):
        SequenceLoader(random_store.store, random_store.thin, tenant=t, dedup=True)


@pytest.mark.slow
def test_dedup_batches_from_worker_processes(random_store: ReaderStore) -> None:
    t = Tenant("t", ("item_id", "action"), 64)
    plain = list(SequenceLoader(random_store.store, random_store.thin, tenant=t, batch_size=64))
    loader = SequenceLoader(random_store.store, random_store.thin, tenant=t, batch_size=64,
                            dedup=True, num_workers=2)
    try:
        got = list(loader)
    finally:
        loader.close()
    for x in got:
        x.validate()
    # Two consumers cut other batches than one: compared request by request.
    assert collect([x.expand() for x in got]) == collect(plain)
    assert sum(x.num_sequences for x in got) < sum(len(x) for x in got)
