"""Shared fixtures: a small synthetic store built once per session, copied per test that mutates.

Tests marked ``slow`` or ``bench`` stay out of the default run (STYLE: slow benchmarks out of the
default run); select them with ``-m slow`` / ``-m bench`` or any other ``-m`` expression.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform import synth
from lmat_platform.protocol.thin import write_thin
from lmat_platform.store import ingest_files, init_store, open_store, publish_snapshot
from lmat_platform.store.core import Store

_OPT_IN_MARKERS = ("slow", "bench")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr", ""):
        return
    skip = pytest.mark.skip(reason="opt-in marker; run with -m slow / -m bench")
    for item in items:
        if any(item.get_closest_marker(m) for m in _OPT_IN_MARKERS):
            item.add_marker(skip)


@dataclass(frozen=True)
class SynthStore:
    """A store built from the workload generator: 3 days ingested, a snapshot at the end of each
    day (published an hour later), each day's requests logged on the streaming path after that
    day's ingest, and every request written again on the batch path."""

    root: Path
    store_path: str
    thin_log: str
    thin_batch: str
    cfg: synth.WorkloadConfig
    event_files: tuple[str, ...]
    request_files: tuple[str, ...]
    requests_all: str

    @property
    def store(self) -> Store:
        return open_store(self.store_path)


SYNTH_CFG = synth.WorkloadConfig(
    seed=3, n_users=40, days=3, events_per_day=800, requests_per_day=120, n_items=300
)


def _build_synth(root: Path) -> SynthStore:
    wl = synth.write_workload(SYNTH_CFG, root / "landing")
    st = init_store(str(root / "store"), n_buckets=4, row_group_rows=64)
    thin_log, thin_batch = str(root / "thin" / "log"), str(root / "thin" / "examples")
    for d, (ef, rf) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
        ingest_files(st, [str(ef)])
        _, end = synth.day_bounds(SYNTH_CFG, d)
        publish_snapshot(st, end, published_at=end + 3600 * 10**6)
        write_thin(st, str(rf), thin_log, path="log")
    req = pa.concat_tables([pq.read_table(str(p)) for p in wl.request_files])
    req_all = str(root / "landing" / "requests-all.parquet")
    pq.write_table(req, req_all)
    write_thin(st, req_all, thin_batch, path="examples")
    return SynthStore(
        root,
        str(root / "store"),
        thin_log,
        thin_batch,
        SYNTH_CFG,
        tuple(map(str, wl.event_files)),
        tuple(map(str, wl.request_files)),
        req_all,
    )


@pytest.fixture(scope="session")
def synth_store_ro(tmp_path_factory: pytest.TempPathFactory) -> SynthStore:
    """The shared synthetic store. Read only: use ``synth_store`` to change anything."""
    return _build_synth(tmp_path_factory.mktemp("synth"))


def copy_synth(src: SynthStore, dest: Path) -> SynthStore:
    """Copy the store, its thin tables and landing files; re-point the copy's thin-table
    registry (it holds absolute paths) at the copied thin tables."""
    from deltalake import write_deltalake

    shutil.copytree(src.root, dest, dirs_exist_ok=True)

    def moved(p: str) -> str:
        return str(dest / os.path.relpath(p, src.root))

    out = replace(
        src,
        root=dest,
        store_path=moved(src.store_path),
        thin_log=moved(src.thin_log),
        thin_batch=moved(src.thin_batch),
        event_files=tuple(map(moved, src.event_files)),
        request_files=tuple(map(moved, src.request_files)),
        requests_all=moved(src.requests_all),
    )
    st = out.store
    reg = st.read_table("thin_tables")
    if reg is not None and reg.num_rows:
        uris = [moved(u) for u in reg.column("uri").to_pylist()]
        reg = reg.set_column(reg.column_names.index("uri"), "uri", pa.array(uris))
        write_deltalake(st.table_uri("thin_tables"), reg, mode="overwrite")
    return out


@pytest.fixture
def synth_store(synth_store_ro: SynthStore, tmp_path: Path) -> SynthStore:
    """A private, writable copy of the shared synthetic store."""
    return copy_synth(synth_store_ro, tmp_path / "synth")
