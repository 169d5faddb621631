"""The Ray Data backend rebuilds the same sequences as SequenceLoader (issue 4, item 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmat_platform as lmat
from lmat_platform.reader import SequenceLoader

pytest.importorskip("ray")

from reader_fixtures import build_store, collect, same  # noqa: E402

TENANT = lmat.Tenant("ranking", ("item_id", "action", "dwell_ms"), 300, window_days=2)


@pytest.mark.ray
def test_ray_backend_matches_sequence_loader(tmp_path: Path) -> None:
    import ray

    from lmat_platform.reader.ray_backend import ensure_ray, iter_ray_batches

    rs = build_store(tmp_path)
    ensure_ray(num_cpus=2)
    try:
        ray_batches = list(iter_ray_batches(rs.store, rs.thin, tenant=TENANT, batch_size=128,
                                            max_unit_rows=200))
    finally:
        ray.shutdown()
    loader = SequenceLoader(rs.store, rs.thin, tenant=TENANT, batch_size=128, max_unit_rows=200)
    want = list(loader)
    got = collect(ray_batches)
    assert same(got, collect(want))
    assert set(ray_batches[0].context) == set(want[0].context)
    assert sum(b.bytes_read for b in ray_batches) == loader.bytes_read
