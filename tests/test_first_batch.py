"""A fresh process's first batch (issue 16): kernels loaded from numba's cache without numba's
full start-up, warm-up loading the kernel variants a pass calls (and no others), and with
workers the first batch made by the main process while they start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from reader_fixtures import ReaderStore, build_store, collect, same

import lmat_platform as lmat
from lmat_platform.reader import Batch, SequenceLoader
from lmat_platform.reader.loader import iter_consumer

TENANT = lmat.Tenant("ranking", ("item_id", "action", "dwell_ms", "event_ts"), 300)
ACTIONS = lmat.Tenant("retrieval", ("item_id",), 64, actions=(1, 2), window_days=1.5)

#: A fresh process: warm_up, then one pass per tenant; prints the kernel variants the passes
#: loaded beyond warm_up's, whether numba's registries were imported, and the batches' digest.
_PASSES = """
import hashlib, json, sys
import lmat_platform.kernels as K
from numba.core.registry import CPUDispatcher
from lmat_platform.reader import SequenceLoader
from lmat_platform.tenants import Tenant

def loaded():
    return {f"{m}.{n}": {str(s) for s in f.signatures}
            for m in list(sys.modules) if m.startswith("lmat_platform")
            for n, f in list(vars(sys.modules[m]).items()) if isinstance(f, CPUDispatcher)}

K.warm_up()
before = loaded()
h = hashlib.sha256()
for d in json.loads(sys.argv[3]):
    t = Tenant(d["name"], tuple(d["columns"]), d["max_len"],
               actions=tuple(d["actions"]) if d["actions"] else None,
               window_days=d["window_days"])
    for b in SequenceLoader(sys.argv[1], sys.argv[2], tenant=t, batch_size=64):
        h.update(b.request_id.numpy().tobytes())
        h.update(b.lengths.numpy().tobytes())
        for c in t.columns:
            h.update(b.values[c].numpy().tobytes())
after = loaded()
print(json.dumps({
    "new": sorted(f"{k}{s}" for k, v in after.items() for s in v - before.get(k, set())),
    "registries": "numba.np.npyimpl" in sys.modules,
    "compiled": sum(sum(f.stats.cache_misses.values())
                    for m in list(sys.modules) if m.startswith("lmat_platform")
                    for f in list(vars(sys.modules[m]).values()) if isinstance(f, CPUDispatcher)),
    "digest": h.hexdigest(),
}))
"""


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> ReaderStore:
    return build_store(tmp_path_factory.mktemp("first-batch"))


def _fresh_passes(rs: ReaderStore, **env: str) -> dict:
    tenants = [{"name": t.name, "columns": list(t.columns), "max_len": t.max_len,
                "actions": list(t.actions) if t.actions else None,
                "window_days": t.window_days} for t in (TENANT, ACTIONS)]
    out = subprocess.run([sys.executable, "-c", _PASSES, rs.store, rs.thin, json.dumps(tenants)],
                         capture_output=True, text=True, check=False, timeout=300,
                         env={**os.environ, "LMAT_DECODE_CACHE_MB": "0", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    res: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def test_fresh_process_loads_kernels_cheaply_and_only_what_a_pass_calls(rs: ReaderStore) -> None:
    """In a fresh process, after ``warm_up`` a pass (streaming and batch-path thin rows, a
    plain tenant and one with an action filter and a window) loads no other kernel variant,
    and loading them from numba's cache did not import numba's typing and lowering registries;
    the batches equal those of kernels loaded numba's own way (``LMAT_NUMBA_FULL_REFRESH=1``).
    On the old code warm_up loaded the writable variants and passes the read-only ones, and
    every load imported the registries."""
    cheap = _fresh_passes(rs)
    if cheap["compiled"]:  # the on-disk cache lacked kernels (first run after a change)
        cheap = _fresh_passes(rs)
        assert not cheap["compiled"]
    full = _fresh_passes(rs, LMAT_NUMBA_FULL_REFRESH="1")
    assert cheap["new"] == [], "warm_up misses variants a pass loads (update kernels.warm_up)"
    assert not cheap["registries"]
    assert full["registries"]
    assert cheap["digest"] == full["digest"]


def _values(batches: list[Batch]) -> list[tuple[list[int], dict[str, list]]]:
    return [(b.request_id.tolist(), {c: v.tolist() for c, v in b.values.items()})
            for b in batches]


@pytest.mark.parametrize("ready_after", [1, 5, None])
def test_workers_first_batches_are_made_while_they_start(
    rs: ReaderStore, monkeypatch: pytest.MonkeyPatch, ready_after: int | None
) -> None:
    """With ``num_workers=2`` a pass whose workers start makes its batches in the main process
    until they are there (at least the first; the old code waited for them), then the workers
    go on where each consumer stopped: the pass has the batches, in the order, of a pass the
    started workers make entirely. ``ready_after``: the workers count as started after this
    many checks (one per local batch but the first; None: never, the whole pass is made
    here)."""
    import lmat_platform.reader.loader as ld

    checks = {"n": 0}
    real_done = ld._Starting.done

    def done(self: ld._Starting) -> bool:
        checks["n"] += 1
        if ready_after is None or checks["n"] < ready_after:
            return False
        self._thread.join()
        return real_done(self)

    monkeypatch.setattr(ld._Starting, "done", done)
    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=50, num_workers=2,
                            max_unit_rows=120)
    try:
        it = iter(loader)
        first = next(it)
        assert loader._pool is None, "the first batch waited for the workers to start"
        assert loader.state_dict()["rows_done"] == [50, 0]
        fresh = [first, *it]
        assert (loader._pool is None) == (ready_after is None)
        monkeypatch.setattr(ld._Starting, "done", real_done)
        if loader._starting is not None:
            loader._starting._thread.join()  # started now
        again = list(loader)  # workers running: every batch from them
        assert loader._pool is not None and loader._pool.alive()
        assert _values(fresh) == _values(again)
        assert len(fresh) == len(loader)
    finally:
        loader.close()


def test_pass_left_at_its_first_batch_keeps_its_workers_starting(
    rs: ReaderStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass given up after its first batch does not wait for the workers it is starting;
    nor does the next pass while they are still starting: it makes its batches here, every
    request once, and leaves them starting (the old code waited for them, seconds at the
    start of every second pass); a pass after they are there uses them, and ``close`` stops
    them."""
    import lmat_platform.reader.loader as ld

    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=50, num_workers=2)
    try:
        it = iter(loader)
        next(it)
        del it  # closes the pass at its first batch
        starting = loader._starting
        assert starting is not None and loader._pool is None
        single = collect(list(SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=50)))
        with monkeypatch.context() as m:
            m.setattr(ld._Starting, "done", lambda self: False)  # still starting
            assert same(collect(list(loader)), single)
            assert loader._pool is None and loader._starting is starting
        starting._thread.join()  # they are there now
        assert same(collect(list(loader)), single)
        pool = loader._pool
        assert pool is not None and loader._starting is None
        assert same(collect(list(loader)), single)  # from the running workers
    finally:
        loader.close()
    assert not any(p.is_alive() for p in pool.procs)


def test_reading_units_when_wanted_gives_the_same_batches(rs: ReaderStore) -> None:
    """``iter_consumer(read_ahead=False)`` (the main process's first batch while workers
    start) reads each unit in the consumer's thread: the same batches as read ahead."""
    loader = SequenceLoader(rs.store, rs.thin, tenant=ACTIONS, batch_size=40, shuffle=True,
                            seed=5, max_unit_rows=100, shuffle_buffer=250)
    spec = loader._specs(1, 0, [0])[0]
    ahead = [b for _, b in iter_consumer(spec)]
    here = [b for _, b in iter_consumer(spec, read_ahead=False)]
    assert _values(ahead) == _values(here)
    assert all(torch.equal(a.lengths, b.lengths) for a, b in zip(ahead, here, strict=True))



def _smaps(addr: int, field: str) -> list[str]:
    """The values of ``field`` in /proc/self/smaps for the mapping holding ``addr``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] == f"{field}:":
                return head[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _thp() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return "[never]"


@pytest.mark.skipif("[never]" in _thp(), reason="no transparent huge pages here: every "
                    "buffer has small pages anyway")
def test_new_batch_buffers_are_in_small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new batch buffer is private memory that may not take transparent huge pages
    (numpy advises its large arrays to huge pages, and with THP ``defrag`` at ``madvise``
    such a fault may compact memory first: 70 MB of new huge pages took 10 ms to 1.57 s to
    fill in a fresh process on this project's machine, of small pages 40-67 ms of CPU);
    ``LMAT_BATCH_HUGE_PAGES=1`` keeps numpy's way. On the old code the buffer came from
    ``np.empty`` and was eligible (numpy's advice)."""
    import numpy as np

    from lmat_platform.reader.buffers import BufferPool

    n = 16 << 20
    small = BufferPool().empty(n // 8, np.int64)
    small[:] = 1
    mid = small.ctypes.data + n // 2
    assert _smaps(mid, "THPeligible") == ["0"]
    assert "sh" not in _smaps(mid, "VmFlags")  # private: a fork does not share it
    monkeypatch.setenv("LMAT_BATCH_HUGE_PAGES", "1")
    pool = BufferPool()
    huge = pool.empty(n // 8, np.int64)
    huge[:] = 1
    # Reuse is unchanged: a dropped batch's buffer is handed out again.
    addr = huge.ctypes.data
    del huge
    assert pool.empty(n // 16, np.int64).ctypes.data == addr


_THP_STATE = """
import ctypes
# The flag is inherited: start from huge pages on (this test process may have them off).
assert ctypes.CDLL(None).prctl(41, 0, 0, 0, 0) == 0
{code}
print([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("THP_enabled:")][0])
"""


_THP_MODES = """
import ctypes, os
from lmat_platform.reader.buffers import avoid_thp_stalls
for mode in ("auto", "keep", "no"):
    assert ctypes.CDLL(None).prctl(41, 0, 0, 0, 0) == 0
    os.environ["LMAT_THP"] = mode
    try:
        avoid_thp_stalls()
    except ValueError as e:
        print(f"ValueError: {e}")
        continue
    print([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("THP_enabled:")][0])
"""


def _thp_enabled_after(code: str, value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LMAT_THP"}
    if value is not None:
        env["LMAT_THP"] = value
    return subprocess.run([sys.executable, "-c", _THP_STATE.format(code=code)],
                          capture_output=True, text=True, check=False, timeout=300, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "[never]" in _thp(),
                    reason="no transparent huge pages here")
def test_reader_process_turns_huge_pages_off_where_faults_stall() -> None:
    """Importing the loader turns transparent huge pages off for the process
    (``PR_SET_THP_DISABLE``) where the kernel's settings make their faults compact memory
    (``enabled`` madvise, ``defrag`` compacting: numpy's and pyarrow's mimalloc's memory, which
    ask for them, stalled a fresh process's first batch by 0.2-0.4 s of CPU here);
    ``LMAT_THP=off`` whatever the settings, ``keep`` never, anything else is refused naming
    the variable. On the old code the process kept them (``THP_enabled: 1``)."""
    from lmat_platform.reader.buffers import thp_stalls

    off = _thp_enabled_after("import lmat_platform.reader.loader", "off")
    assert off.returncode == 0, off.stderr[-2000:]
    assert off.stdout.split()[-1] == "0"
    # The other settings in one process, the flag reset before each call.
    modes = subprocess.run([sys.executable, "-c", _THP_MODES], capture_output=True, text=True,
                           check=False, timeout=300)
    assert modes.returncode == 0, modes.stderr[-2000:]
    auto, keep, bad = modes.stdout.splitlines()[-3:]
    assert auto == ("0" if thp_stalls() else "1")
    assert keep == "1"
    assert bad == "ValueError: LMAT_THP must be auto, off or keep, but got 'no'"


def test_workers_start_once_the_first_batch_is_made(
    rs: ReaderStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers' start (a forkserver process importing the reader: seconds of CPU) begins
    once the main process has made the pass's first batch, not beside it (on 2 cores it
    competed with it); the pass is the same. On the old code they started before any batch
    was made."""
    import lmat_platform.reader.loader as ld

    made = {"n": 0}
    at_start: list[int] = []
    real_iter, real_init = ld.iter_consumer, ld._Starting.__init__

    def counting(*a: object, **k: object):  # type: ignore[no-untyped-def]
        for got in real_iter(*a, **k):  # type: ignore[arg-type]
            made["n"] += 1
            yield got

    def init(self: ld._Starting, start: object) -> None:
        at_start.append(made["n"])
        real_init(self, start)  # type: ignore[arg-type]

    monkeypatch.setattr(ld, "iter_consumer", counting)
    monkeypatch.setattr(ld._Starting, "__init__", init)
    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=50, num_workers=2)
    try:
        fresh = list(loader)
        again = list(loader)
    finally:
        loader.close()
    assert at_start == [1]
    assert _values(fresh) == _values(again)


_WARM_BEFORE_TORCH = """
import sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and name not in seen:
            k = sys.modules.get("lmat_platform.kernels")
            seen[name] = k is not None and k._WARMING is not None
        return None

sys.meta_path.insert(0, Watch())
import lmat_platform.reader
print(seen.get("torch"))
"""


def test_kernels_warm_up_starts_before_torch_is_imported() -> None:
    """``import lmat_platform.reader`` starts the kernels' warm-up before it imports torch
    and pyarrow, so that it overlaps their import (about 0.15 s of CPU that was left to the
    first batch); on the old code it started after them, from the loader module."""
    out = subprocess.run([sys.executable, "-c", _WARM_BEFORE_TORCH], capture_output=True,
                         text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "True"
