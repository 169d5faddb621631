"""A pass with nothing kept (issue 16): thin tables merged to one file per bucket, read the
same; every sequence stays the spec's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

import lmat_platform as lmat
from lmat_platform.protocol.thin import compact_thin
from lmat_platform.reader import SequenceLoader
from lmat_platform.store.core import delta_dataset
from tests.helpers import expected_outputs, read, run_main
from tests.reader_fixtures import build_store, collect, same

SHORT = lmat.Tenant("short", ("item_id", "action"), 16)
LONG = lmat.Tenant("long", ("item_id", "dwell_ms", "event_ts"), 4000)


def _live(thin: str) -> pa.Table:
    return pa.table(DeltaTable(thin).get_add_actions(flatten=True))


def test_compacted_thin_table_reads_the_same(tmp_path: Path) -> None:
    rs = build_store(tmp_path)  # 3 request files: 2 on the streaming path, 1 on the batch path
    before = {t.name: collect(list(SequenceLoader(rs.store, rs.thin, tenant=t, batch_size=40)))
              for t in (SHORT, LONG)}
    rows = delta_dataset(DeltaTable(rs.thin)).to_table().sort_by("request_id")
    n_files = _live(rs.thin).num_rows

    out = compact_thin(rs.store, rs.thin)
    live = _live(rs.thin)
    buckets = live.column("partition.bucket").to_pylist()
    assert len(buckets) == len(set(buckets)) == out["files_out"] < n_files
    # A layout-only commit; every row and column unchanged.
    log = Path(rs.thin) / "_delta_log" / f"{out['version']:020d}.json"
    acts = [json.loads(x) for x in log.read_text().splitlines()]
    changed = [a[k] for a in acts for k in ("add", "remove") if k in a]
    assert len(changed) == n_files + out["files_out"]
    assert not any(a["dataChange"] for a in changed)
    assert any(a.get("commitInfo", {}).get("lmat.op") == "compact_thin" for a in acts)
    assert delta_dataset(DeltaTable(rs.thin)).to_table().sort_by("request_id").equals(rows)
    assert compact_thin(rs.store, rs.thin)["files_out"] == 0  # nothing left to merge

    events = read(lmat.open_store(rs.store), "raw").to_pylist()
    requests = rows.select(["request_id", "user_id", "request_ts"]).to_pylist()
    for t in (SHORT, LONG):
        got = collect(list(SequenceLoader(rs.store, rs.thin, tenant=t, batch_size=40)))
        assert same(got, before[t.name]), t.name
        want = {r: {c: [float("nan") if v is None else v for v in w[c]] for c in t.columns}
                for r, w in expected_outputs(events, requests, t).items()}
        assert same(got, want), t.name


def test_compaction_sorts_head_summaries(tmp_path: Path) -> None:
    """Compaction merges each bucket's head summaries (one file per snapshot) into one file
    sorted by (user, snapshot), layout only: the same rows, ``dataChange = false``."""
    from lmat_platform import synth
    from lmat_platform.protocol.pointers import HeadIndex
    from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot

    cfg = synth.WorkloadConfig(seed=2, n_users=40, days=3, events_per_day=800,
                               requests_per_day=10)
    wl = synth.write_workload(cfg, tmp_path / "wl")
    st = init_store(str(tmp_path / "store"), n_buckets=2)
    for d, ef in enumerate(wl.event_files):
        ingest_files(st, [str(ef)])
        publish_snapshot(st, synth.day_bounds(cfg, d)[1])
    heads = str(tmp_path / "store" / "heads")
    key = [("user_id", "ascending"), ("snapshot_id", "ascending")]
    rows = delta_dataset(DeltaTable(heads)).to_table().sort_by(key)
    assert _live(heads).num_rows == 6
    out = compact_buckets(st)
    assert out["heads_files_removed"] == 6
    live = _live(heads)
    assert sorted(live.column("partition.bucket").to_pylist()) == [0, 1]
    assert delta_dataset(DeltaTable(heads)).to_table().sort_by(key).equals(rows)
    log = sorted((Path(heads) / "_delta_log").glob("*.json"))[-1]
    acts = [json.loads(x) for x in log.read_text().splitlines()]
    assert not any(a[k]["dataChange"] for a in acts for k in ("add", "remove") if k in a)
    for p in live.column("path").to_pylist():
        t = pq.read_table(Path(heads) / p)
        assert t.equals(t.sort_by(key)), p  # sorted: readers take it as it is
        assert len(HeadIndex.of_files(st, [f"{heads}/{p}"]).user_id) == t.num_rows


def test_cli_compact_ranks_stripes_and_merges_thin_tables(tmp_path: Path, capsys: Any) -> None:
    """``lmat compact --stripes-as-of K --thin URI``; a negative snapshot is refused in one
    line with exit 2 and nothing changed."""
    rs = build_store(tmp_path)
    uih = str(Path(rs.store) / "uih")
    v0 = DeltaTable(uih).version()
    rc, _, err = run_main(capsys, ["compact", rs.store, "--min-files", "1",
                                   "--stripes-as-of", "-1"])
    assert rc == 2 and "stripes_as_of" in err and len(err.strip().splitlines()) == 1
    assert DeltaTable(uih).version() == v0
    n_thin = _live(rs.thin).num_rows
    rc, out, _ = run_main(capsys, ["compact", rs.store, "--min-files", "1",
                                   "--stripes-as-of", "0", "--thin", rs.thin])
    assert rc == 0, out
    got = json.loads(out)
    assert got["thin"][rs.thin]["files_in"] == n_thin > got["thin"][rs.thin]["files_out"]
    names = [p.split("/")[-1] for p in _live(uih).column("path").to_pylist()]
    assert names and all(n.startswith("c-000000-s") for n in names)


def test_split_bucket_decodes_its_heads_and_row_groups_once_a_pass(
        tmp_path: Path, monkeypatch: Any) -> None:
    """With the decoded cache off, the units of a bucket split into several (small
    ``max_unit_rows``) load the bucket's head summaries and decode each tier row group once a
    pass, shared while the reader is in that bucket (before: once per unit, and the row groups
    at the slices' borders again), and the batches are those of whole-bucket units."""
    from collections import Counter

    from lmat_platform.protocol.pointers import HeadIndex
    from lmat_platform.store import cache as cache_mod

    rs = build_store(tmp_path)
    monkeypatch.setattr(cache_mod, "_CACHE", cache_mod.DecodedCache(0))
    whole = {t.name: collect(list(SequenceLoader(rs.store, rs.thin, tenant=t, batch_size=40)))
             for t in (SHORT, LONG)}
    decoded: Counter[tuple[Any, ...]] = Counter()
    loads: list[int] = []
    read_groups = pq.ParquetFile.read_row_groups
    from_table = HeadIndex._from_table.__func__  # type: ignore[attr-defined]

    def count_groups(self: pq.ParquetFile, row_groups: list[int], *a: Any, **k: Any) -> Any:
        md = self.metadata
        f = (md.num_rows, md.serialized_size, md.num_row_groups)
        decoded.update((f, g) for g in row_groups)
        return read_groups(self, row_groups, *a, **k)

    def count_loads(cls: type, t: Any) -> Any:
        loads.append(t.num_rows)
        return from_table(cls, t)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", count_groups)
    monkeypatch.setattr(HeadIndex, "_from_table", classmethod(count_loads))
    for t in (SHORT, LONG):
        loader = SequenceLoader(rs.store, rs.thin, tenant=t, batch_size=40, max_unit_rows=60)
        units = [u for c in loader.plan() for u in c]
        assert max(u.parts for u in units) >= 3, t.name
        for _ in range(2):  # each pass decodes again: nothing is kept between passes
            decoded.clear()
            loads.clear()
            got = collect(list(loader))
            assert same(got, whole[t.name]), t.name
            assert decoded and max(decoded.values()) == 1, (t.name, decoded.most_common(3))
            assert len(loads) == len({u.bucket for u in units}), (t.name, len(loads))


def test_read_thin_file_types_fills_and_orders_columns(tmp_path: Path) -> None:
    """A thin file read as the table's schema: the partition column from the file's folder, a
    column the file lacks as nulls, every column in the asked order and type; the projected
    schemas kept per table are not served to another table's schema (a wider type there)."""
    import numpy as np
    import pyarrow.dataset as pads

    from lmat_platform.protocol.thin import read_thin_file

    folder = tmp_path / "bucket=3"
    folder.mkdir()
    pq.write_table(pa.table({"request_id": pa.array([5, 6], pa.int64()),
                             "head_len": pa.array([1, 2], pa.int32())}), folder / "f.parquet")
    cols = ["request_id", "bucket", "tail_len", "head_len"]
    for head_len in (pa.int32(), pa.int64()):
        schema = pa.schema([("request_id", pa.int64()), ("head_len", head_len),
                            ("tail_len", pa.int32()), ("bucket", pa.int32())])
        ds = pads.dataset(str(tmp_path), format="parquet", partitioning="hive", schema=schema)
        (frag,) = ds.get_fragments()
        for _ in range(2):  # the second read from the kept schemas
            t = read_thin_file(frag, ds.schema, cols)
            assert t.schema == pa.schema([schema.field(c) for c in cols])
            assert t.to_pydict() == {"request_id": [5, 6], "bucket": [3, 3],
                                     "tail_len": [None, None], "head_len": [1, 2]}
        assert np.asarray(t.column("bucket")).dtype == np.int32
