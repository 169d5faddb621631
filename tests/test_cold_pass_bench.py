"""bench.cold_pass's worker children time passes the worker processes make (issue 16).

Since 505c87a a pass that finds the workers still starting makes its batches in the main
process; the ``lmat_cold_w1/w2`` children timed the passes right after the first, so at load
(workers start in seconds, a pass takes a fraction of one) they timed the main process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_fixtures import ReaderStore, build_store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> ReaderStore:
    return build_store(tmp_path_factory.mktemp("cold_pass"))


@pytest.mark.timeout(120)
def test_worker_child_times_passes_the_workers_make(rs: ReaderStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("LMAT_DECODE_CACHE_MB", "0")
    from bench import cold_pass

    res = cold_pass.child_lmat({"store": rs.store, "thin": rs.thin}, "short", 1, 1)
    # The timed passes' batches came from the worker: it spent CPU on them.
    assert res["workers_cpu_s"] > 0, res
    assert res["examples"] > 0 and res["workers_up_s"] >= 0
