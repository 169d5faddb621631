"""Reader worker processes (issue 16): one pass at a time, a newer iterator cancels the older
one, shared-memory slots are never reused under a batch the consumer holds, and the
main process's per-batch transport."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reader_fixtures import (
    ReaderStore,
    build_store,
    collect,
    same,
    workers_from_the_second_batch,
)

import lmat_platform as lmat
from lmat_platform.reader import Batch, ReaderPassCancelledError, SequenceLoader

TENANT = lmat.Tenant("ranking", ("item_id", "action", "dwell_ms", "event_ts"), 300)


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> ReaderStore:
    return build_store(tmp_path_factory.mktemp("workers"))


@pytest.fixture(autouse=True)
def _workers_from_the_second_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about batches the workers make."""
    workers_from_the_second_batch(monkeypatch)


@pytest.fixture(scope="module")
def reference(rs: ReaderStore) -> dict:
    return collect(list(SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=64)))


def _loader(rs: ReaderStore, **kw: Any) -> SequenceLoader:
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
        it1: Any = iter(loader)
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


def _made(writer: Any, B: int, n: int, *, dedup: bool = False) -> Batch:
    """A batch of B requests and n values made in ``writer``'s slots, as the reader makes it."""
    item, act = writer.alloc([(n, np.dtype(np.int64)), (n, np.dtype(np.int8))])
    item[:] = np.arange(n)
    act[:] = np.arange(n) % 7
    U = max(B // 2, 1) if dedup else B
    lens = np.full(U, n // U, dtype=np.int64)
    lens[-1] += n - int(lens.sum())
    rid = np.arange(B, dtype=np.int64) + 1000
    return Batch(request_id=torch.from_numpy(rid), lengths=torch.from_numpy(lens),
                 values={"item_id": torch.from_numpy(item), "action": torch.from_numpy(act)},
                 context={"label": torch.from_numpy(np.arange(B, dtype=np.float32))},
                 user_id=torch.from_numpy(rid % 5), request_ts=torch.from_numpy(rid * 3),
                 bytes_read=B * 10, thin_bytes_read=B,
                 inverse_indices=torch.from_numpy(np.arange(B) % U) if dedup else None)


def _equal(a: Batch, b: Batch) -> bool:
    def arrays(x: Batch) -> dict:
        d = {f: getattr(x, f) for f in ("request_id", "lengths", "user_id", "request_ts",
                                        "inverse_indices")}
        d.update({f"v.{c}": v for c, v in x.values.items()})
        d.update({f"c.{c}": v for c, v in x.context.items()})
        return d
    da, db = arrays(a), arrays(b)
    return (da.keys() == db.keys() and (a.bytes_read, a.thin_bytes_read) ==
            (b.bytes_read, b.thin_bytes_read) and all(
                (da[k] is None and db[k] is None) or
                (da[k].dtype == db[k].dtype and torch.equal(da[k], db[k])) for k in da))


def test_batches_cross_as_a_header_and_views_of_the_slot() -> None:
    """Worker and main side of the transport in one process: a batch in a slot whose handle
    and layout the main process has is a 72-byte header (nothing pickled); the main process
    rebuilds it, per-request arrays and context included, as views of the slot; a new slot,
    a new layout (dedup adds inverse_indices), per-request arrays that do not fit behind the
    values, and a batch in ordinary memory (every slot taken) all arrive equal too."""
    import pickle

    from lmat_platform.reader.workers import (
        _HEAD,
        BATCH,
        MAX_SLOTS,
        SLOT,
        SLOT_PICKLED,
        SlotReader,
        SlotWriter,
        header,
    )

    flags = torch.zeros(MAX_SLOTS, dtype=torch.int8)
    writer, reader = SlotWriter(flags), SlotReader(flags)
    kinds = []
    for i, (B, n, dedup) in enumerate([(4, 100, False), (4, 90, False), (5, 100, False),
                                       (8, 100, True), (8, 100, True), (3, 5000, False)]):
        sent = _made(writer, B, n, dedup=dedup)
        want = _made(SlotWriter(torch.ones(MAX_SLOTS, dtype=torch.int8)), B, n, dedup=dedup)
        msg = writer.pack(1, i, sent)
        writer.sent()
        kinds.append(msg[0])
        got = reader.unpack(msg)
        assert _equal(got, want), i
        if msg[0] == SLOT:
            assert len(msg) == _HEAD.size == 72
            slot = reader.bases[header(msg)[3]]
            assert slot is not None
            lo, hi = slot.ctypes.data, slot.ctypes.data + slot.nbytes
            assert all(lo <= t.data_ptr() < hi for t in (got.request_id, got.context["label"],
                                                         got.values["item_id"])), "not views"
            del slot
        del got, sent  # the consumer drops it: its slot is freed at the next unpack
    # slot 0 new, and with it every slot the worker's window needs / slot 1 (slot 0 not yet
    # seen free): header only, its handle came with the first / slot 0 again: header only /
    # new layout (dedup adds inverse_indices) / header only / the plain layout again
    assert kinds == [SLOT_PICKLED, SLOT, SLOT, SLOT_PICKLED, SLOT, SLOT_PICKLED], kinds
    assert all(b is not None for b in reader.bases), "slots not all made with the first"
    # Per-request arrays that do not fit behind the values: pickled behind the header.
    writer.reserve = 0
    big = _made(writer, 40_000, 10, dedup=False)
    msg = writer.pack(1, 9, big)
    writer.sent()
    assert msg[0] == SLOT_PICKLED and "small" in pickle.loads(msg[_HEAD.size:])
    assert _equal(reader.unpack(msg), _made(SlotWriter(torch.ones(MAX_SLOTS, dtype=torch.int8)),
                                            40_000, 10))
    # Every slot taken (the consumer holds them all): the batch goes the ordinary way.
    flags[:] = 1
    plain = _made(writer, 4, 10)
    msg = writer.pack(1, 10, plain)
    assert msg[0] == BATCH and _equal(reader.unpack(msg), plain)


def test_a_slot_made_for_a_batch_never_sent_is_announced_with_the_next() -> None:
    """The worker side alone: a slot made (or grown) for a batch that a cancelled pass then did
    not send goes out with its shared-memory handle on the next batch that uses it."""
    import pickle

    from lmat_platform.reader.workers import _HEAD, MAX_SLOTS, SLOT, SLOT_PICKLED, SlotWriter

    def extra(msg: bytes) -> dict:
        return pickle.loads(msg[_HEAD.size:]) if msg[0] == SLOT_PICKLED else {}

    flags = torch.zeros(MAX_SLOTS, dtype=torch.int8)
    writer = SlotWriter(flags)
    _made(writer, 2, 4)
    writer.release_last()  # cancelled before it was sent
    msg = writer.pack(1, 2, _made(writer, 2, 4))
    assert "new" in extra(msg), "the slot's handle was never sent"
    writer.sent()
    flags.zero_()
    msg = writer.pack(1, 4, _made(writer, 2, 4))
    assert msg[0] == SLOT  # slot and layout known to the main process now


def test_unguarded_main_line_finds_the_script_line_outside_the_guard(tmp_path: Path) -> None:
    """The main process names an unguarded script's line before any worker starts; lines under
    `if __name__ == "__main__":` (not its else branch) and code without a file pass."""
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(
        "from lmat_platform.reader.loader import _unguarded_main_line as u\n"
        "def f():\n    return u()\n"
        "a = f()\n"
        "if __name__ == '__main__':\n    b = f()\nelse:\n    pass\n"
        "if '__main__' == __name__:\n    c = f()\nelse:\n    c = 0\n"
        "if True:\n    d = f()\n"
        "print(a, b, c, d)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["4", "None", "None", "14"], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", script.read_text()], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["None"] * 4, r.stderr[-2000:]


def test_deep_prefetch_keeps_batches_in_slots_and_permits_come_back_in_groups(
        rs: ReaderStore, reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``prefetch=8`` and a consumer slower than the workers, every batch the workers make
    still crosses in one of their reused slots (a header, not a pickled batch whose tensors
    each bring a shared-memory handle), and the batches are those of a 0-worker pass. The main
    process gives a worker's permits back in groups (one wake-up of the worker per group),
    never holding back more than the group, so the worker always has ``prefetch`` batches
    ahead. The old code had 8 slots a worker whatever the prefetch: a worker 8 batches ahead
    ran out and sent pickled batches."""
    from lmat_platform.reader import workers as wk

    kinds: list[int] = []
    real = wk.SlotReader.unpack

    def unpack(self: Any, msg: bytes) -> Batch:
        kinds.append(msg[0])
        return real(self, msg)

    monkeypatch.setattr(wk.SlotReader, "unpack", unpack)
    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=16, num_workers=2,
                            prefetch=8, timeout_s=60)
    try:
        got = []
        for i, b in enumerate(loader):
            got.append(Batch(request_id=b.request_id.clone(), lengths=b.lengths.clone(),
                             values={c: v.clone() for c, v in b.values.items()}))
            del b
            if i < 12:
                time.sleep(0.1)  # the workers fill their pipes
            pool = loader._pool
            if pool is not None:
                assert all(h < (g or 1) for h, g in zip(pool.held, pool.group, strict=True))
        assert same(collect(got), reference)
        assert kinds and wk.BATCH not in kinds, kinds
        pool = loader._pool
        assert pool is not None and pool.group == [wk.MAX_GROUP] * 2, pool.group
    finally:
        loader.close()
