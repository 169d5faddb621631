"""Reader worker processes (issue 16): one pass at a time, a newer iterator cancels the older
one, shared-memory slots are never reused under a batch the consumer holds, and the
main process's per-batch transport."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from reader_fixtures import ReaderStore, build_store, collect, same

import lmat_platform as lmat
from lmat_platform.reader import Batch, ReaderPassCancelledError, SequenceLoader

TENANT = lmat.Tenant("ranking", ("item_id", "action", "dwell_ms", "event_ts"), 300)


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> ReaderStore:
    return build_store(tmp_path_factory.mktemp("workers"))


@pytest.fixture(scope="module")
def reference(rs: ReaderStore) -> dict:
    return collect(list(SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=64)))


def _loader(rs: ReaderStore, **kw: object) -> SequenceLoader:
    return SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=16, num_workers=2,
                          shuffle=True, seed=2, max_unit_rows=60, timeout_s=60, **kw)


def _order(batches: list[Batch]) -> list[int]:
    return [int(r) for b in batches for r in b.request_id]


def _settle(loader: SequenceLoader) -> None:
    """Wait until every worker has stopped taking slots: it has filled what the consumer
    lets it and waits to hand over its next batch (the moment a cancelled pass leaves a
    slot made for a batch it then does not send)."""
    pool = loader._pool
    assert pool is not None
    last, since, deadline = None, time.monotonic(), time.monotonic() + 60
    while time.monotonic() < deadline:
        now = [int(r.flags.sum()) for r in pool.readers]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0 and min(now) >= 2:
            return
        time.sleep(0.05)
    raise AssertionError(f"workers never settled: slots in use {last}")


@pytest.mark.parametrize("new_epoch", [True, False], ids=["set_epoch", "same_epoch"])
def test_a_new_iterator_cancels_the_previous_pass(rs: ReaderStore, reference: dict,
                                                  new_epoch: bool) -> None:
    """Take a few batches from one iterator, let the workers fill their slots, (set a new
    epoch,) start a second iterator: it yields its whole pass, every request once, in the
    order of an undisturbed pass of that epoch; the batches of the first pass still held keep
    their values (their slots are not reused under them); the first iterator then raises
    ReaderPassCancelledError and, closing, leaves the new pass's look-ahead alone. The old
    code failed the second iterator's first batch (an assertion: a slot made for a batch of
    the cancelled pass that was never sent was later used without its handle)."""
    loader = _loader(rs)
    try:
        it1 = iter(loader)
        held = [next(it1) for _ in range(3)]
        kept = [{c: v.clone() for c, v in b.values.items()} for b in held]
        _settle(loader)
        if new_epoch:
            loader.set_epoch(1)
        it2 = iter(loader)
        got = list(it2)
        pool = loader._pool
        assert pool is not None
        ahead = pool.ahead
        assert ahead is not None
        with pytest.raises(ReaderPassCancelledError, match="newer iterator"):
            next(it1)
        assert pool.ahead == ahead, "the cancelled pass dropped the newer pass's look-ahead"
        for b, k in zip(held, kept, strict=True):
            for c, v in k.items():
                assert torch.equal(b.values[c], v), f"a held batch's {c} was overwritten"
        assert same(collect(got), reference)
        loader.set_epoch(1 if new_epoch else 0)
        assert _order(got) == _order(list(loader)), "the new pass lost or repeated batches"
        del held
        assert same(collect(list(loader)), reference)
    finally:
        loader.close()


def test_closing_a_cancelled_iterator_keeps_the_newer_pass_running(rs: ReaderStore,
                                                                   reference: dict) -> None:
    """Without persistent workers a pass stops its workers when it ends, but not a pass a newer
    iterator cancelled: closing it late (the garbage collector does) must not stop the
    workers under the newer pass."""
    loader = _loader(rs, persistent_workers=False)
    try:
        it1 = iter(loader)
        for _ in range(3):
            next(it1)
        it2 = iter(loader)
        got = [next(it2)]
        it1.close()
        got += list(it2)
        assert same(collect(got), reference)
        assert loader._pool is None, "the finished pass did not stop its workers"
    finally:
        loader.close()


def test_a_slot_made_for_a_batch_never_sent_is_announced_with_the_next() -> None:
    """The worker side alone: a slot made (or grown) for a batch that a cancelled pass then did
    not send goes out with its shared-memory handle on the next batch that uses it."""
    from lmat_platform.reader.workers import MAX_SLOTS, SlotWriter

    flags = torch.zeros(MAX_SLOTS, dtype=torch.int8)
    writer = SlotWriter(flags)
    b = Batch(request_id=torch.arange(2), lengths=torch.tensor([2, 2]),
              values={"item_id": torch.zeros(4, dtype=torch.int64)})
    writer.alloc([(4, np.dtype(np.int64))])
    writer.release_last()  # cancelled before it was sent
    writer.alloc([(4, np.dtype(np.int64))])
    msg = writer.pack(b)
    assert msg["new"] is not None, "the slot's handle was never sent"
    writer.sent()
    writer.release_last()
    flags.zero_()
    writer.alloc([(4, np.dtype(np.int64))])
    assert writer.pack(b)["new"] is None  # known to the main process now
