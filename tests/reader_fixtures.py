"""Fixtures shared by the reader tests: a small store with heavy users, thin rows on both paths."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from lmat_platform import synth
from lmat_platform.protocol.thin import write_thin
from lmat_platform.reader import Batch
from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot
from lmat_platform.store.core import delta_dataset


@dataclass
class ReaderStore:
    root: Path
    store: str
    thin: str


def build_store(
    tmp: Path,
    *,
    n_buckets: int = 4,
    row_group_rows: int = 256,
    cfg: synth.WorkloadConfig | None = None,
) -> ReaderStore:
    """By default 3 days, 50 Zipf users (the heaviest with ~1,500 events), 900 requests: days 0
    and 1 on the streaming path, day 2 on the batch path; compacted, so row groups are small and
    sorted."""
    cfg = cfg or synth.WorkloadConfig(seed=1, n_users=50, days=3, events_per_day=3000,
                                      requests_per_day=300)
    wl = synth.write_workload(cfg, tmp / "wl")
    st = init_store(str(tmp / "store"), n_buckets=n_buckets, row_group_rows=row_group_rows)
    thin = str(tmp / "thin")
    for d, (ef, rf) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
        ingest_files(st, [str(ef)])
        write_thin(st, str(rf), thin, path="log" if d < 2 else "examples")
        _, e = synth.day_bounds(cfg, d)
        publish_snapshot(st, e, published_at=e + 3600 * 10**6)
    compact_buckets(st)
    return ReaderStore(tmp, str(tmp / "store"), thin)


def copy_store(rs: ReaderStore, dest: Path) -> ReaderStore:
    shutil.copytree(rs.store, dest / "store")
    shutil.copytree(rs.thin, dest / "thin")
    return ReaderStore(dest, str(dest / "store"), str(dest / "thin"))


def write_bad_thin(rs: ReaderStore, out: str, *, bump: int = 100) -> None:
    """A copy of the thin table whose pointers name snapshots the store does not have."""
    dt = DeltaTable(rs.thin)
    t = delta_dataset(dt).to_table()
    i = t.schema.get_field_index("snapshot_id")
    t = t.set_column(i, "snapshot_id",
                     pa.array(t.column("snapshot_id").to_numpy() + bump, pa.int32()))
    desc = dt.metadata().description
    write_deltalake(out, t, partition_by=["bucket"], description=desc)
    assert json.loads(desc or "{}")


def collect(batches: list[Batch]) -> dict[int, dict[str, list]]:
    """request_id -> column -> sequence (lists), from jagged batches."""
    out: dict[int, dict[str, list]] = {}
    for b in batches:
        b.validate()
        off = b.offsets().numpy()
        vals = {c: v.numpy() for c, v in b.values.items()}
        for i, r in enumerate(b.request_id.tolist()):
            if r in out:
                raise AssertionError(f"request {r} yielded twice")
            out[r] = {c: v[off[i]:off[i + 1]].tolist() for c, v in vals.items()}
    return out


def materialized(path: str, columns: tuple[str, ...]) -> dict[int, dict[str, list]]:
    t = pq.read_table(path)
    rid = t.column("request_id").to_pylist()
    cols = {c: t.column(c).to_pylist() for c in columns}
    return {r: {c: cols[c][i] for c in columns} for i, r in enumerate(rid)}


def same(a: dict[int, dict[str, list]], b: dict[int, dict[str, list]]) -> bool:
    """Equal element for element (NaN equal to NaN)."""
    if a.keys() != b.keys():
        return False
    for r, cols in a.items():
        for c, v in cols.items():
            x, y = np.asarray(v, dtype=float), np.asarray(b[r][c], dtype=float)
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                return False
    return True


def workers_from_the_second_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass whose workers start makes its batches in the main process until they are there
    (tests/test_first_batch.py). For tests about batches the workers make: the first batch
    comes from the main process, then the pass waits for the workers."""
    import lmat_platform.reader.loader as ld

    real = ld._Starting.done

    def done(self: ld._Starting) -> bool:
        self._thread.join()
        return real(self)

    monkeypatch.setattr(ld._Starting, "done", done)
